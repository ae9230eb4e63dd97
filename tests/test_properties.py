"""Property-based tests (hypothesis) of the loop's building blocks over random trees, random accept
paths and random block complexities: attention masks, position ids, verification and KV compaction,
each against a direct reference computed from the parent pointers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp.errors import ConfigError
from mtp.esp import ESP, esp_layout, fit_widths, static_parents
from mtp.kv import PreallocatedLayer, keep_rows
from mtp.loop import Decoder, tree_block, tree_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def trees(draw, max_nodes=40):
    """Parent pointers of a random tree in topological order (parents[0] = -1: the root)."""
    n = draw(st.integers(1, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


def ancestors_or_self(parents: list[int], i: int) -> set[int]:
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


@settings(max_examples=200, deadline=None)
@given(trees())
def test_tree_layout_is_ancestor_attention_and_depth(parents):
    depth, allowed = tree_layout(parents)
    n = len(parents)
    for i in range(n):
        assert depth[i] == len(ancestors_or_self(parents, i)) - 1
        assert {j for j in range(n) if allowed[i, j]} == ancestors_or_self(parents, i)


@settings(max_examples=150, deadline=None)
@given(trees(max_nodes=25), st.integers(1, 3))
def test_esp_layout_masks_see_their_owners_prefix(parents, k):
    """Mask j of owner b: position = pos(b) + j, sees b's ancestors-or-self, b's masks 1..j-1 and itself."""
    depth, allowed = esp_layout(parents, k)
    n = len(parents)
    assert depth.shape == (n * (k + 1),) and allowed.shape == (n * (k + 1),) * 2
    tree_depth, tree_allowed = tree_layout(parents)
    assert torch.equal(depth[:n], tree_depth) and torch.equal(allowed[:n, :n], tree_allowed)
    assert not allowed[:n, n:].any()  # tree rows never see masks
    for b in range(n):
        for j in range(1, k + 1):
            r = n + b * k + j - 1
            assert depth[r] == tree_depth[b] + j
            seen = {c for c in range(n * (k + 1)) if allowed[r, c]}
            assert seen == ancestors_or_self(parents, b) | {n + b * k + i for i in range(j)}


@settings(max_examples=100, deadline=None)
@given(st.integers(4, 200), st.integers(1, 3))
def test_fitted_static_trees_fit_the_budget(bc, k):
    if (k + 1) * (k + 1) > bc:  # k depths of width >= 1, each of the k + 1 rows per node: too small
        with pytest.raises(ConfigError, match=f"bc={bc} is too small for ESP with k={k} masks"):
            ESP(bc=bc, k=k)
        return
    widths = fit_widths(bc, k)
    assert len(widths) == k and min(widths) >= 1
    assert (k + 1) * (1 + sum(widths)) <= bc
    d = ESP(bc=bc, k=k)
    depth, allowed = d.layout
    assert len(depth) == (k + 1) * len(static_parents(widths)) <= bc


@st.composite
def tree_and_path(draw):
    """A random tree with distinct sibling tokens and a random accepted path from the root."""
    parents = draw(trees(max_nodes=30))
    n = len(parents)
    ids = [draw(st.integers(0, 49))]
    children: dict[int, list[int]] = {}
    for i in range(1, n):
        used = {ids[c] for c in children.get(parents[i], [])}
        ids.append(draw(st.integers(0, 49).filter(lambda t, used=used: t not in used)))
        children.setdefault(parents[i], []).append(i)
    path = [0]
    while children.get(path[-1]) and draw(st.booleans()):
        path.append(draw(st.sampled_from(children[path[-1]])))
    return parents, ids, path, children


@settings(max_examples=200, deadline=None)
@given(tree_and_path(), st.integers(50, 60))
def test_greedy_verification_accepts_exactly_the_argmax_path(tp, bonus):
    """Logits whose argmax at each path node is the next path node's token (and at the last node a token
    none of its children carry) make the verifier return that path and commit its tokens + the bonus."""
    parents, ids, path, children = tp
    n, V = len(parents), 64
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(len(path)))
    for a, b in zip(path, path[1:]):
        logits[a, ids[b]] = 100.0
    logits[path[-1], bonus] = 100.0  # 50..60: no child carries it (child tokens are < 50)
    block = tree_block(ids, parents)
    dec = Decoder.__new__(Decoder)
    dec.temperature = 0.0
    got_path, committed = dec._verify(block, logits)
    assert got_path == path
    assert committed == [ids[b] for b in path[1:]] + [bonus]


class FakeLayer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class FakeCache:
    def __init__(self, layers):
        self.layers = layers


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 20), tree_and_path(), st.integers(0, 5), st.integers(1, 3))
def test_kv_compaction_keeps_prefix_then_path_rows_in_order(n_prefix, tp, extra, n_layers):
    """After compaction every layer holds the prefix rows, then the accepted rows in path order; probe
    rows after the tree (extra) and rejected rows are gone. Chain prefixes and general paths alike."""
    parents, _, path, _ = tp
    T = len(parents) + extra
    g = torch.Generator().manual_seed(n_prefix * 101 + T)
    layers = [FakeLayer(torch.randn(1, 2, n_prefix + T, 4, generator=g), torch.randn(1, 2, n_prefix + T, 4, generator=g))
              for _ in range(n_layers)]
    before = [(layer.keys.clone(), layer.values.clone()) for layer in layers]
    keep_rows(FakeCache(layers), n_prefix, path)
    rows = list(range(n_prefix)) + [n_prefix + r for r in path]
    for layer, (k, v) in zip(layers, before):
        assert torch.equal(layer.keys, k[:, :, rows]) and torch.equal(layer.values, v[:, :, rows])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.lists(st.tuples(st.integers(1, 12), tree_and_path()), min_size=1, max_size=8))
def test_preallocated_cache_equals_concatenation(capacity, steps):
    """The loop's preallocated layer (in-place appends, in-place compaction, growth by doubling) holds
    exactly what concatenating and index-selecting tensors would, after any sequence of steps."""
    g = torch.Generator().manual_seed(capacity)
    layer = PreallocatedLayer(capacity)
    ref_k = ref_v = None
    for n_new, (parents, _, path, _) in steps:
        t = max(n_new, len(parents))
        k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
        n_prefix = layer.get_seq_length()
        out_k, out_v = layer.update(k, v)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], 2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], 2)
        assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
        keep_rows(FakeCache([layer]), n_prefix, path)
        rows = list(range(n_prefix)) + [n_prefix + r for r in path]
        ref_k, ref_v = ref_k[:, :, rows], ref_v[:, :, rows]
        assert layer.get_seq_length() == len(rows)
        assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
