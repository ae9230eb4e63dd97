"""A sliding-window architecture (a tiny random Gemma 3: one layer with a window of 8 positions, one global
layer) on the one loop: every prompt is longer than the window, so the window matters. Tree forwards equal
sequential decoding, the compacted cache equals the accepted path's, and every method's greedy output is AR's."""

import pytest
import torch

from mtp.kv import keep_rows, new_cache, with_cache
from mtp.loop import Decoder, Drafter, tree_block
from mtp.models import chat_ids, load_model
from mtp.runner import build_drafter

from .conftest import PROMPTS, compose_cfg

PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4, 6, 7]


@pytest.fixture(scope="module")
def gemma():
    model, tok = load_model(compose_cfg(["model=tiny_gemma3"]).model)
    prompts = [chat_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    assert model.config.sliding_window < min(map(len, prompts))
    return model, tok, prompts


def _prefill(model, ids):
    cache = new_cache(model.config, len(ids) + 64)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), **with_cache(model, cache))
    return cache


def _path(i):
    out = []
    while i >= 0:
        out.append(i)
        i = PARENTS[i]
    return out[::-1]


def test_ar_equals_generate_past_the_window(gemma):
    model, _, prompts = gemma
    for ids in prompts:
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        assert Decoder(model, []).generate(Drafter(), ids, 24).new_ids == ref


def test_tree_forward_equals_sequential_past_the_window(gemma):
    model, tok, prompts = gemma
    prompt = prompts[1]
    tokens = torch.randint(0, model.config.vocab_size, (len(PARENTS),), generator=torch.Generator().manual_seed(0)).tolist()
    cache = _prefill(model, prompt)
    with torch.inference_mode():
        tree_logits, _ = Decoder(model, [])._forward(tree_block(tokens, PARENTS), cache, len(prompt))
        for i in range(len(PARENTS)):
            ref = model(torch.tensor([prompt + [tokens[j] for j in _path(i)]])).logits[0, -1].float()
            torch.testing.assert_close(tree_logits[i], ref, atol=1e-4, rtol=1e-4)


def test_kv_compaction_equals_the_accepted_path_past_the_window(gemma):
    model, _, prompts = gemma
    prompt, tokens = prompts[0], list(range(10, 10 + len(PARENTS)))
    for accepted in ([0, 2, 6, 8], [0, 1, 4, 7, 9], [0]):
        cache = _prefill(model, prompt)
        with torch.inference_mode():
            Decoder(model, [])._forward(tree_block(tokens, PARENTS), cache, len(prompt))
            keep_rows(cache, len(prompt), accepted)
        ref = _prefill(model, prompt + [tokens[i] for i in accepted])
        for layer, ref_layer in zip(cache.layers, ref.layers, strict=True):
            torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bc", [10, 30, 60])
def test_every_method_is_ar_on_a_sliding_window_model(gemma, bc):
    model, _, prompts = gemma
    decoder = Decoder(model, [])
    ar = [decoder.generate(Drafter(), ids, 24).new_ids for ids in prompts]
    for method in ("esp", "esp_dynamic", "esp_plus", "pld", "lade", "stand", "recycling", "suffix", "sam", "sam_tr", "logitspec"):
        drafter = build_drafter(compose_cfg(["model=tiny_gemma3", f"method={method}", f"bc={bc}"]))
        drafter.setup(model)
        for ids, ref in zip(prompts, ar):
            assert decoder.generate(drafter, ids, 24).new_ids == ref, (method, bc)


@pytest.fixture(scope="module")
def gemma_270m():
    """The real Gemma 3 270M, a Spec-Bench summarization prompt longer than its window, and AR's output."""
    from mtp.data import load_questions

    cfg = compose_cfg(["model=gemma3_270m", "task=spec_bench", "task.per_category=1", "task.categories=[summarization]"])
    model, tok = load_model(cfg.model)
    ids = chat_ids(tok, [{"role": "user", "content": load_questions(cfg.task)[0].turns[0]}])
    return model, ids, Decoder(model, []).generate(Drafter(), ids, 12).new_ids


@pytest.mark.slow
@pytest.mark.parametrize("bc", [10, 30, 60])
def test_gemma3_270m_from_pypi_every_method_is_ar(gemma_270m, bc):
    """The real Gemma 3 270M (sliding window 512 in 5 of 6 layers, 262k vocabulary), installed by the set-up from
    PyPI: every method's greedy output is AR's at bc 10/30/60 on a Spec-Bench prompt past the window."""
    model, ids, ar = gemma_270m
    assert model.config.sliding_window == 512 and "sliding_attention" in model.config.layer_types
    assert len(ids) > model.config.sliding_window  # the window matters on this prompt
    decoder = Decoder(model, [])
    for method in ("esp", "esp_dynamic", "esp_plus", "pld", "lade", "stand", "recycling", "suffix", "sam", "sam_tr",
                   "logitspec"):
        drafter = build_drafter(compose_cfg(["model=gemma3_270m", f"method={method}", f"bc={bc}"]))
        drafter.setup(model)
        g = decoder.generate(drafter, ids, 12)
        assert g.new_ids == ar and g.tokens_fed_max <= bc, (method, bc)


@pytest.mark.parametrize("init", ["mean", "last_k"])
def test_masks_live_in_the_scaled_input_space(gemma, init):
    """Gemma multiplies embedding rows by sqrt(hidden): ESP's masks are built from the rows the model is fed
    (a mask of init last_k is exactly the embedding layer's output for those tokens), not from the raw table."""
    from mtp.masks import MaskEmbeddings

    model, _, prompts = gemma
    embed = model.get_input_embeddings()
    assert float(embed.embed_scale) != 1.0
    masks = MaskEmbeddings(k=2, init=init)
    masks.setup(model)
    rows = masks.start(prompts[0])
    with torch.inference_mode():
        fed = embed(torch.tensor(prompts[0]))
    want = fed[-2:] if init == "last_k" else fed.float().mean(0).expand(2, -1)
    torch.testing.assert_close(rows.float(), want.float(), atol=1e-5, rtol=1e-5)
    masks.update([prompts[0][0]])
    torch.testing.assert_close(masks.vectors[0], want[0].float() + masks.lam * (fed[0].float() - want[0].float()),
                               atol=1e-5, rtol=1e-5)
