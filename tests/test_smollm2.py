"""Every method on the real default model (SmolLM2-135M, fp32): greedy output identical to AR on a few
prompts at bc 30, tokens per forward within bc, and τ > 1 where the method drafts from the model."""

import pytest

from baselines.logitspec import LogitSpec
from baselines.lookahead import Lookahead
from baselines.pld import PromptLookup
from baselines.recycling import TokenRecycling
from baselines.sam import SAMDecoding, SAMWithRecycling
from baselines.stand import Stand
from baselines.suffix import SuffixDecoding
from mtp.esp import ESP
from mtp.esp_plus import ESPPlus
from mtp.loop import Drafter

from .conftest import decode

METHODS = {  # name -> (drafter at bc 30, smallest pooled τ expected on these prompts)
    "esp": (lambda: ESP(bc=30), 1.1),
    "stand": (lambda: Stand(bc=30, model_name="smollm2_135m"), 1.1),
    "recycling": (lambda: TokenRecycling(bc=30), 1.0),
    "pld": (lambda: PromptLookup(bc=30), 1.0),
    "lade": (lambda: Lookahead(bc=30), 1.0),
    "suffix": (lambda: SuffixDecoding(bc=30), 1.0),
    "sam": (lambda: SAMDecoding(bc=30), 1.0),
    "sam_tr": (lambda: SAMWithRecycling(bc=30, model_name="smollm2_135m"), 1.0),
    "logitspec": (lambda: LogitSpec(bc=30), 1.0),
    "esp_plus": (lambda: ESPPlus(bc=30), 1.6),  # Token Recycling: 1.48 on these prompts
}


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_lossless_on_smollm2(smollm2, name):
    model, tok, prompts = smollm2
    make, min_tau = METHODS[name]
    drafter = make()
    drafter.setup(model)
    committed = calls = 0
    for ids in prompts[:2]:
        ref = decode(model, Drafter(), ids, eos=[tok.eos_token_id], n=32)
        g = decode(model, drafter, ids, eos=[tok.eos_token_id], n=32, setup=False)
        assert g.new_ids == ref.new_ids, name
        assert g.tokens_fed_max <= 30
        committed, calls = committed + sum(g.committed_per_step), calls + g.decode_calls
    assert committed / calls >= min_tau
