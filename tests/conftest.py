"""Shared fixtures: tiny random models (inline configs from conf/model/tiny_*.yaml) and the real default model."""

import pytest
import torch

from mtp.cli import compose
from mtp.loop import Decoder, Drafter
from mtp.models import chat_ids, load_model

PROMPTS = [
    "Write a short poem about the sea and the sea and the sea.",
    "List the numbers from one to ten: one, two, three,",
    "What is the capital of France? Answer in one word.",
]


compose_cfg = compose  # the config `python run.py <overrides>` runs


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_qwen3"])
def tiny(request):
    """(model, tokenizer, prompts as ids) of a tiny random model, fp32 on CPU."""
    cfg = compose_cfg([f"model={request.param}"])
    model, tok = load_model(cfg.model)
    return model, tok, [chat_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="session")
def smollm2():
    cfg = compose_cfg(["model=smollm2_135m"])
    model, tok = load_model(cfg.model)
    return model, tok, [chat_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]


def decode(model, drafter, ids, eos=(), n=30, temperature=0.0, seed=0, setup=True):
    """One generation of `drafter` (set up for the job first unless `setup=False`)."""
    if setup:
        drafter.setup(model)
    return Decoder(model, list(eos), temperature, seed).generate(drafter, ids, n)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU they contend (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def refs(tiny, request):
    """AR's greedy output for each tiny-model prompt, N_NEW tokens (the test module's) without EOS."""
    model, tok, prompts = tiny
    n = getattr(request.module, "N_NEW", 30)
    return [decode(model, Drafter(), ids, n=n).new_ids for ids in prompts]
