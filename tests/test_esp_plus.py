"""ESP+: greedy output identical to AR for every ingredient set, the tensor-built layout equal to the
reference layouts, one node per distinct token under a parent, a prefix-closed tree within bc, and rates
that follow what is accepted."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp.errors import ConfigError
from mtp.esp import esp_layout
from mtp.esp_plus import ESPPlus, tree_masks, with_masks
from mtp.loop import Block, Step, tree_layout

from .conftest import decode
from .test_properties import trees

N_NEW = 30
pytestmark = pytest.mark.usefixtures("one_thread")
run = functools.partial(decode, n=N_NEW)

GRID = [
    (bc, opts)
    for bc in (4, 10, 30, 60)
    for opts in ({}, {"sources": ["recycling"]}, {"sources": ["ngram"]}, {"sources": ["esp"]},
                 {"sources": ["recycling", "ngram"]}, {"adaptive": False}, {"k": 2, "mask_rows": 3},
                 {"momentum": 0.5, "init": "recent"}, {"k": 2, "mask_rows": 2, "depth_lam": True}, {"size": "cost"})
    if bc >= 2 + opts.get("mask_rows", 1) * opts.get("k", 1)
]


@pytest.mark.parametrize("bc,opts", GRID, ids=[f"bc{bc}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'full'}" for bc, o in GRID])
def test_greedy_equals_ar(tiny, refs, bc, opts):
    model, _, prompts = tiny
    drafter = ESPPlus(bc=bc, **opts)
    drafter.setup(model)  # once: the successor matrix and the rates carry over from prompt to prompt
    for ids, ref in zip(prompts, refs):
        g = run(model, drafter, ids, setup=False)
        assert g.new_ids == ref
        assert g.tokens_fed_max <= bc


def test_it_drafts_more_than_each_source_alone(tiny, refs):
    """On the tiny models the merged tree accepts more per step than recycling or n-grams alone."""
    model, _, prompts = tiny
    tau = {}
    for name, opts in {"all": {}, "recycling": {"sources": ["recycling"]}, "ngram": {"sources": ["ngram"]}}.items():
        d = ESPPlus(bc=30, **opts)
        d.setup(model)
        gens = [run(model, d, ids, setup=False) for ids in prompts]
        tau[name] = sum(sum(g.committed_per_step) for g in gens) / sum(g.decode_calls for g in gens)
    assert tau["all"] > max(tau["recycling"], tau["ngram"]) and tau["all"] > 1.2, tau


def test_config_errors():
    with pytest.raises(ConfigError, match="subset"):
        ESPPlus(bc=30, sources=["medusa"])
    with pytest.raises(ConfigError, match="too small"):
        ESPPlus(bc=5, k=2, mask_rows=2)
    assert ESPPlus(bc=5, k=2, mask_rows=2, sources=["recycling"]).n_tree == 5  # no masks without the esp source


@settings(max_examples=150, deadline=None)
@given(trees(max_nodes=30), st.integers(1, 3))
def test_tensor_layout_equals_the_reference(parents, k):
    """tree_masks (one op per depth level) = tree_layout; masks on every node = ESP's layout."""
    depth, allowed = tree_layout(parents)
    p = torch.tensor(parents)
    assert torch.equal(tree_masks(p, depth), allowed)
    n = len(parents)
    d_all, a_all = with_masks(allowed, depth, torch.arange(n), k)
    d_ref, a_ref = esp_layout(parents, k)
    assert torch.equal(d_all, d_ref) and torch.equal(a_all, a_ref)
    owners = torch.tensor(sorted({0, n - 1}))  # masks on a subset: each mask row sees its owner's prefix
    d_sub, a_sub = with_masks(allowed, depth, owners, k)
    for i, b in enumerate(owners.tolist()):
        for j in range(1, k + 1):
            r = n + i * k + j - 1
            assert d_sub[r] == depth[b] + j
            assert torch.equal(a_sub[r, :n], allowed[b]) and (a_sub[r, n:].nonzero().flatten() + n).tolist() == list(range(n + i * k, r + 1))


class Table:  # the few attributes ESPPlus.setup reads from a model
    def __init__(self, V=50, H=8):
        self.w = torch.nn.Embedding(V, H)

    def get_input_embeddings(self):
        return self.w


def test_merged_tree_is_prefix_closed_with_one_node_per_token():
    """Recycling and the n-gram copy propose the same child: one node, ranked above either alone."""
    d = ESPPlus(bc=12, sources=["recycling", "ngram"])
    d.setup(Table())
    d.adj[7] = torch.tensor([3, 4, 5, 6, 8, 9, 10, 11])
    d.adj[3] = torch.tensor([12, 13, 14, 15, 16, 17, 18, 19])
    d.adj_filled[[7, 3]] = True
    tokens = [1, 2, 7, 3, 20, 21, 1, 2, 7]  # "1 2 7" occurred before: the copy proposes 3 20 21 1 ...
    block = d.propose(tokens)
    ids, parents = block.ids.tolist(), block.parents
    assert ids[0] == 7 and len(ids) <= 12
    kids = {}
    for i, p in enumerate(parents[1:], start=1):
        assert 0 <= p < i
        kids.setdefault(p, []).append(ids[i])
    assert all(len(v) == len(set(v)) for v in kids.values())  # one node per distinct token under a parent
    assert ids[1] == 3  # proposed by both sources: the best-scored child, first in BFS order
    depth, allowed = tree_layout(parents)
    assert torch.equal(block.depth, depth) and torch.equal(block.allowed, allowed)
    assert 20 in ids and ids[parents[ids.index(20)]] == 3  # the copy continues under the shared node


def test_rates_follow_what_is_accepted():
    """Steps where only the n-gram copy is accepted raise the n-gram rate and lower recycling's."""
    d = ESPPlus(bc=12, sources=["recycling", "ngram"])
    d.setup(Table())
    d.adj[7] = torch.tensor([3, 4, 5, 6, 8, 9, 10, 11])
    d.adj_filled[7] = True
    before = d.rates()
    tokens = [1, 2, 7, 30, 31, 1, 2, 7]  # the copy proposes 30 31 ...; recycling 3 4 5 ...
    for _ in range(10):
        block = d.propose(tokens)
        ids = block.ids.tolist()
        path = [0, ids.index(30)]
        logits = torch.zeros(block.size, 50)
        d.observe(Step(Block(block.ids, block.parents, block.layout), logits, path, [30, 31]))
    after = d.rates()
    assert after[d.b_ngram] > before[d.b_ngram] and after[0] < before[0]


def test_cost_sizing_follows_the_forward_time_curve():
    """size=cost: with a forward time flat in the block size the tree fills the budget; with a time
    proportional to the size (every draft costs a whole forward) no draft pays, so the block is the root
    and its masks."""
    d = ESPPlus(bc=12, sources=["recycling", "ngram"])
    d.setup(Table())
    d.size = "cost"  # with the curve set here instead of timed on a model
    d.adj[7] = torch.tensor([3, 4, 5, 6, 8, 9, 10, 11])
    d.adj[3] = torch.tensor([12, 13, 14, 15, 16, 17, 18, 19])
    d.adj_filled[[7, 3]] = True
    tokens = [1, 2, 7, 3, 20, 21, 1, 2, 7]
    d.t_of = torch.ones(13)
    assert d.propose(tokens).size == 12
    d.t_of = torch.arange(13, dtype=torch.float)
    assert d.propose(tokens).size == 1
