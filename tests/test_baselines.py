"""PLD and Token Recycling: greedy output identical to AR at every bc, blocks within bc, and the
drafting rules checked against transformers (PLD) and the published tree (Token Recycling)."""

import functools

import pytest
import torch

from baselines.pld import PromptLookup
from baselines.recycling import TEMPLATE_80, TokenRecycling, tree_for_bc
from mtp.loop import Decoder, Drafter

from .conftest import decode

BCS = (10, 17, 30, 60)


pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 40
run = functools.partial(decode, n=N_NEW)


@pytest.mark.parametrize("bc", BCS)
@pytest.mark.parametrize("make", [
    lambda bc: PromptLookup(bc),
    lambda bc: PromptLookup(bc, truncated=True, tree=True),
    lambda bc: TokenRecycling(bc),
    lambda bc: TokenRecycling(bc, reset_per_prompt=True),
], ids=["pld", "pld_tree", "recycling", "recycling_reset"])
def test_greedy_equals_ar(tiny, refs, bc, make):
    model, tok, prompts = tiny
    drafter = make(bc)
    drafter.setup(model)
    dec = Decoder(model, [])
    for ids, ref in zip(prompts, refs):  # one drafter for all prompts: job-level state carries over
        g = dec.generate(drafter, ids, 40)
        assert g.new_ids == ref and g.tokens_fed_max <= bc


def test_pld_accepts_on_repetition(tiny):
    model, tok, prompts = tiny
    ids = prompts[0]
    ref = run(model, Drafter(), ids, n=60).new_ids
    # the AR output of a tiny random model loops; PLD copies the loop
    g = run(model, PromptLookup(30), ids, n=60)
    assert g.new_ids == ref
    assert sum(g.committed_per_step) / g.decode_calls > 1.0


def test_pld_matches_transformers_prompt_lookup():
    """With truncated continuations and n <= 2, our first match is transformers' candidate, for every
    prefix of a repetitive sequence (transformers also cuts drafts after an EOS; no EOS here)."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 6, (80,), generator=g).tolist()
    hf = PromptLookupCandidateGenerator(num_output_tokens=10, max_matching_ngram_size=2, max_length=10_000)
    ours = PromptLookup(bc=11, max_ngram_size=2, num_pred_tokens=10, truncated=True)
    for L in range(2, len(seq)):
        prefix = seq[:L]
        cand, _ = hf.get_candidates(torch.tensor([prefix]))
        hf_draft = cand[0, L:].tolist()
        assert ours.propose(prefix).ids[1:].tolist() == hf_draft, L


def test_pld_reference_rule_needs_whole_continuation():
    d = PromptLookup(bc=4, max_ngram_size=2, num_pred_tokens=3)
    # "7 8" occurs at 0 with continuation [1, 2, 3]; the later "7 8" at 5 has only [9] after it
    assert d.propose([7, 8, 1, 2, 3, 7, 8, 9, 7, 8]).ids.tolist() == [8, 1, 2, 3]
    assert d.propose([5, 6, 7, 1]).ids.tolist() == [1]  # no earlier match: AR step


def test_recycling_trees():
    assert len(TEMPLATE_80) == 80 and [sum(len(p) == d for p in TEMPLATE_80) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    for bc in (10, 17, 30, 60, 81, 120):
        paths = tree_for_bc(bc)
        assert len(paths) == min(bc, 81) - 1 and len(set(paths)) == len(paths)
        assert all(p[:-1] in set(paths) | {()} for p in paths)  # prefix-closed


def test_recycling_drafts_from_the_matrix(tiny):
    model, tok, prompts = tiny
    d = TokenRecycling(bc=10)
    d.setup(model)
    d.adj[5] = torch.arange(10, 18)
    d.adj[10] = torch.arange(20, 28)
    d.adj[20] = torch.arange(30, 38)
    block = d.propose([1, 5])  # root 5: [0]..[3] = 10..13, [0,0] = 20, [0,1] = 21, [1,0] = adj[11][0] = 0
    assert block.ids.tolist() == [5, 10, 11, 12, 13, 20, 21, 0, 30, 0]
    assert block.parents == [-1, 0, 0, 0, 0, 1, 1, 2, 5, 8]
