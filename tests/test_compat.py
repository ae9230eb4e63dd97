"""transformers compatibility: the cache goes to the forward under the argument name the installed version takes
(`cache` from 5.24, `past_key_values` before), and a generation raises no FutureWarning."""

import warnings

import torch

from mtp.kv import new_cache, with_cache
from mtp.loop import Decoder
from mtp.runner import build_drafter

from .conftest import compose_cfg


class NewForward:  # transformers >= 5.24
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kwargs):
        pass


class OldForward:  # transformers < 5.24
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                **kwargs):
        pass


def test_the_cache_goes_under_the_name_the_forward_takes():
    cache = object()
    assert with_cache(NewForward(), cache) == {"cache": cache, "use_cache": True}
    assert with_cache(OldForward(), cache) == {"past_key_values": cache, "use_cache": True}


def test_the_installed_models_take_the_cache_without_a_warning(tiny):
    model = tiny[0]
    cache = new_cache(model.config, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(input_ids=torch.tensor([[1, 2, 3]]), **with_cache(model, cache))
    assert out.logits.shape[1] == 3 and cache.get_seq_length() == 3


def test_a_generation_of_every_kind_warns_nothing(tiny):
    model, _, prompts = tiny
    decoder = Decoder(model, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("esp", "lade", "pld"):  # probe rows in the prefill, a tree layout, a chain
            drafter = build_drafter(compose_cfg([f"method={method}", "bc=10"]))
            drafter.setup(model)
            decoder.generate(drafter, prompts[0], 8)
