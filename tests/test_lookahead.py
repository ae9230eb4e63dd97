"""Lookahead decoding (LADE): greedy output identical to AR for every option at paper and odd bc, blocks
within bc, window/trie rows equal to sequential decoding of their chains, a worked example of the window
and the pool written out by hand, and tau > 1 on a tiny model whose output repeats."""

import functools
import itertools

import pytest
import torch
from transformers import DynamicCache

from baselines.lookahead import CANDIDATES, Lookahead, fit_params, lru_insert, max_tokens
from mtp.errors import ConfigError
from mtp.kv import with_cache
from mtp.loop import Decoder, Drafter, Step
from mtp.runner import build_drafter

from .conftest import compose_cfg, decode

N_NEW = 40
BCS = (10, 17, 30, 60)


pytestmark = pytest.mark.usefixtures("one_thread")
run = functools.partial(decode, n=N_NEW)


# --------------------------------------------------------------------------- configuration
def test_fit_by_bc():
    assert [fit_params(bc) for bc in (10, 30, 60)] == [(3, 4, 1), (4, 5, 5), (5, 8, 7)]  # the paper's
    assert fit_params(17) == (3, 5, 3) and max_tokens(3, 5, 3) == 16  # largest candidate within bc
    assert fit_params(56) == (5, 7, 7)  # Spec-Bench's setting
    assert [max_tokens(*c) for c in CANDIDATES] == sorted(max_tokens(*c) for c in CANDIDATES)
    for bc in range(6, 130):  # every fit fits, and it is the biggest candidate that does
        n, w, g = fit_params(bc)
        assert max_tokens(n, w, g) <= bc
        assert max_tokens(n, w, g) == max(s for s in map(lambda c: max_tokens(*c), CANDIDATES) if s <= bc)
    assert fit_params(30, N=3) == (3, 8, 7)  # an explicit value replaces it in every candidate
    assert fit_params(10, N=7, W=2, G=9) == (7, 2, 9)  # all three explicit: taken as given (checked below)
    with pytest.raises(ConfigError, match="too small"):
        Lookahead(bc=5)
    with pytest.raises(ConfigError, match="more than bc=10"):
        Lookahead(bc=10, N=4, W=5, G=5)
    with pytest.raises(ConfigError, match="N >= 2"):
        Lookahead(bc=30, N=1)
    # tokens per forward = (N-1)(W+G) when W >= N-2; with a narrower window the warm-up peaks
    assert max_tokens(4, 5, 5) == 30 and max_tokens(4, 5, 5, full_match_bonus=False) == 25
    assert max_tokens(6, 2, 1) == 12 + 5  # window sizes 6, 10, 12, 12, 10 over warm-up


def test_yaml_builds():
    d = build_drafter(compose_cfg(["method=lade", "bc=17"]))
    assert isinstance(d, Lookahead) and (d.N, d.W, d.G) == (3, 5, 3) and d.min_bc == 16
    d = build_drafter(compose_cfg(["method=lade", "bc=30", "method.N=3", "method.full_match_bonus=false"]))
    assert (d.N, d.W, d.G) == (3, 8, 7) and d.min_bc == 2 * 8 + 7
    with pytest.raises(ConfigError, match="too small"):
        build_drafter(compose_cfg(["method=lade", "bc=5"]))


# --------------------------------------------------------------------------- exactness on tiny models
@pytest.mark.parametrize("bc", BCS)
def test_greedy_equals_ar(tiny, refs, bc):
    model, tok, prompts = tiny
    for pool_from_prompt, full_match_bonus in itertools.product((False, True), (True, False)):
        d = Lookahead(bc=bc, pool_from_prompt=pool_from_prompt, full_match_bonus=full_match_bonus)
        d.setup(model)
        dec = Decoder(model, [])
        gens = [dec.generate(d, ids, N_NEW) for ids in prompts]  # one drafter for all prompts, as a job
        for g, ref in zip(gens, refs):
            assert g.new_ids == ref
            assert g.tokens_fed_max <= d.min_bc <= bc
            # a step commits at most N (full match + bonus), or N-1 with the reference's behaviour
            assert max(g.committed_per_step) <= (d.N if full_match_bonus else d.N - 1)
        # per-generation state: the first prompt again gives the very same steps
        assert dec.generate(d, prompts[0], N_NEW).committed_per_step == gens[0].committed_per_step


def test_explicit_narrow_window_warmup_sizes(tiny, refs):
    """(N, W, G) = (6, 2, 1): window sizes 6 (in the prefill), 10, 12, 12 over the warm-up, then 10 (+ a trie
    <= 5)."""
    model, tok, prompts = tiny
    sizes = []

    class Recording(Lookahead):
        def propose(self, tokens):
            block = super().propose(tokens)
            sizes.append(block.size)
            return block

    d = Recording(bc=17, N=6, W=2, G=1)
    g = run(model, d, prompts[0])
    assert g.new_ids == refs[0] and g.tokens_fed_max <= 17
    assert sizes[:4] == [10, 12, 12, 10] and max(sizes) <= 17


def test_eos_mid_block(tiny, refs):
    model, tok, prompts = tiny
    for ids, ref in zip(prompts, refs):
        eos = ref[len(ref) // 2]
        cut = ref[: ref.index(eos) + 1]
        g = run(model, Lookahead(bc=30, pool_from_prompt=True), ids, eos=[eos])
        assert g.new_ids == cut and g.stop == "eos"


def test_sampling_reproduces_ar_samples(tiny):
    model, tok, prompts = tiny
    for seed in range(2):
        for ids in prompts:
            ar = run(model, Drafter(), ids, temperature=1.0, seed=seed).new_ids
            assert run(model, Lookahead(bc=30), ids, temperature=1.0, seed=seed).new_ids == ar


def _chain_logits(model, prompt, chain):
    return model(input_ids=torch.tensor([prompt + chain])).logits[0, -1].float()


@pytest.mark.parametrize("N,W,G,warm", [(4, 4, 2, False), (4, 4, 2, True), (3, 3, 3, False)])
def test_block_rows_equal_sequential_chains(tiny, N, W, G, warm):
    """Every row's logits in one block forward = the logits of its own chain decoded sequentially:
    trie nodes see root + their n-gram prefix, window column i is [root, row0[1..i], row1[i], ..., row_l[i]]."""
    model, tok, prompts = tiny
    prompt = prompts[1]
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(4, V, (k,), generator=gen).tolist()  # noqa: E731
    d = Lookahead(bc=max_tokens(N, W, G), N=N, W=W, G=G)
    d.start(prompt)
    if warm:  # fill level 1 of 2: C = W+N-3 columns
        C = W + N - 3
        d.rows = [rand(C - 1), rand(C)]
    else:
        d.rows = [rand(W - 1)] + [rand(W) for _ in range(N - 2)]
    root = 7
    ngrams = [tuple(rand(N - 1)) for _ in range(G)]
    ngrams[-1] = ngrams[0][:1] + ngrams[-1][1:]  # a shared first token: the trie merges it
    d.pool = {root: ngrams}
    block = d.propose(prompt + [root])
    # the trie holds exactly the n-grams, prefix-merged
    ids = block.ids.tolist()
    paths = set()
    for leaf in range(1, block.n_tree):
        if leaf not in block.parents:
            node, path = leaf, []
            while node > 0:
                path.append(ids[node])
                node = block.parents[node]
            paths.add(tuple(reversed(path)))
    assert paths == set(ngrams) and block.n_tree == 1 + len({g[:k] for g in ngrams for k in range(1, N)})

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prompt]), **with_cache(model, cache))
    logits, _ = Decoder(model, [])._forward(block, cache, len(prompt))
    chains = []
    for r in range(block.n_tree):
        node, chain = r, []
        while node >= 0:
            chain.append(ids[node])
            node = block.parents[node]
        chains.append(chain[::-1])
    rows, C = d.rows, len(d.rows[0]) + 1
    chains += [[root] + rows[0][: c] for c in range(1, C)]  # row 0, columns 1..C-1
    for level in range(1, len(rows)):
        chains += [[root] + rows[0][:i] + [rows[k][i] for k in range(1, level + 1)] for i in range(C)]
    assert len(chains) == block.size
    for r, chain in enumerate(chains):
        assert int(block.depth[r]) == len(chain) - 1
        torch.testing.assert_close(logits[r], _chain_logits(model, prompt, chain), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- worked example
def _onehot(argmaxes, V=16):
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 1.0
    return logits


def _allowed_rows(block):
    return [block.allowed[r].nonzero().flatten().tolist() for r in range(block.size)]


def _step(block, argmaxes):
    """The loop's verification on crafted logits -> the Step the drafter observes."""
    logits = _onehot(argmaxes)
    verifier = Decoder.__new__(Decoder)  # its greedy verification only: no model needed
    verifier.temperature = 0.0
    path, committed = verifier._verify(block, logits)
    return Step(block, logits, path, committed)


def test_worked_example():
    """N=3, W=3, G=2 (bc 10). Prompt [5, 5, 5] -> row 0 = [5, 5, 5] (W+N-3 = 3 random prompt tokens)."""
    d = Lookahead(bc=10, N=3, W=3, G=2)
    assert d.min_bc == 10  # root + window: 4 (warm-up) / 6 (full); trie <= (N-1)G = 4
    d.start([5, 5, 5])
    d.observe_prefill(None, 1, None)
    assert d.rows == [[5, 5, 5]] and d.pool == {}

    # step 1 (warm-up): [root 1 | row0 5 5 5], a causal chain at positions p..p+3
    b = d.propose([5, 5, 5, 1])
    assert b.ids.tolist() == [1, 5, 5, 5] and b.parents == [-1]
    assert b.depth.tolist() == [0, 1, 2, 3]
    assert _allowed_rows(b) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    s = _step(b, [2, 3, 4, 6])  # root -> 2 (committed); row 0 -> [3, 4, 6] = the new row 1
    assert s.committed == [2]
    d.observe(s)
    assert d.rows == [[5, 5], [3, 4, 6]] and d.pool == {}  # every row loses column 0; no pool update yet

    # step 2 (full): [root 2 | row0 5 5 (cols 1,2) | row1 3 4 6 (cols 0,1,2)]
    b = d.propose([5, 5, 5, 1, 2])
    assert b.ids.tolist() == [2, 5, 5, 3, 4, 6] and b.parents == [-1]
    assert b.depth.tolist() == [0, 1, 2, 1, 2, 3]  # row0 col c -> c; row1 col i -> 1 + i
    assert _allowed_rows(b) == [[0], [0, 1], [0, 1, 2], [0, 3], [0, 1, 4], [0, 1, 2, 5]]
    s = _step(b, [5, 0, 0, 8, 9, 8])  # root -> 5; last row -> new = [8, 9, 8]
    d.observe(s)
    # 3-grams per column: key root / row0[i-1], value (row1[i], new[i])
    assert d.pool == {2: [(3, 8)], 5: [(4, 9), (6, 8)]}
    assert d.rows == [[4, 6], [8, 9, 8]]  # row0 <- row1[1:], row1 <- new

    # step 3: root 5 has two n-grams in the pool -> a trie 5 -> 4 -> 9, 5 -> 6 -> 8, then the window
    b = d.propose([5, 5, 5, 1, 2, 5])
    assert b.ids.tolist() == [5, 4, 9, 6, 8, 4, 6, 8, 9, 8] and b.parents == [-1, 0, 1, 0, 3]
    assert b.size == 10 == (3 - 1) * (3 + 2)
    assert b.depth.tolist() == [0, 1, 2, 1, 2, 1, 2, 1, 2, 3]
    assert _allowed_rows(b) == [[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4],  # trie: ancestors
                                [0, 5], [0, 5, 6], [0, 7], [0, 5, 8], [0, 5, 6, 9]]  # window: columns
    s = _step(b, [4, 9, 11, 0, 0, 0, 0, 12, 13, 12])  # 5 -> 4 -> 9 match, bonus 11
    assert s.path == [0, 1, 2] and s.committed == [4, 9, 11]
    d.observe(s)
    # the pool caps key 5 at G = 2: (4, 9) was the least recently used and goes
    assert d.pool == {2: [(3, 8)], 5: [(6, 8), (8, 12)], 4: [(9, 13)], 6: [(8, 12)]}
    assert d.rows == [[9, 8], [12, 13, 12]]  # slid by one column although 3 tokens were committed

    # the reference's behaviour (full_match_bonus=false): n-grams proposed cut to N-2 = 1 token
    r = Lookahead(bc=10, N=3, W=3, G=2, full_match_bonus=False)
    assert r.min_bc == 6 + 2
    r.start([5, 5, 5])
    r.rows, r.pool = [[4, 6], [8, 9, 8]], {5: [(4, 9), (6, 8)]}
    b = r.propose([5, 5, 5, 1, 2, 5])
    assert b.ids.tolist() == [5, 4, 6, 4, 6, 8, 9, 8] and b.parents == [-1, 0, 0]
    s = _step(b, [4, 9, 0, 0, 0, 12, 13, 12])
    assert s.committed == [4, 9]  # a full n-gram match commits N-1 = 2 tokens, as the reference code


def test_pool_from_prompt_and_lru():
    pool = {}
    for v in [(1,), (2,), (1,), (3,)]:
        lru_insert(pool, 0, v, 2)
    assert pool == {0: [(1,), (3,)]}  # (1,) moved to the end, then (2,) was the oldest
    d = Lookahead(bc=10, N=3, W=3, G=2, pool_from_prompt=True)
    d.start([1, 2, 3, 1, 2, 4, 1, 2, 3])
    assert d.pool == {1: [(2, 4), (2, 3)], 2: [(3, 1), (4, 1)], 3: [(1, 2)], 4: [(1, 2)]}
    d.observe_prefill(None, 1, None)  # the committed token's n-gram (2, 3, 1) joins, as most recent
    assert d.pool[2] == [(4, 1), (3, 1)]
    b = d.propose([1, 2, 3, 1, 2, 4, 1, 2, 3, 1])
    assert b.ids.tolist()[:4] == [1, 2, 4, 3] and b.parents == [-1, 0, 1, 1]  # shared prefix 2 fed once
    # the window starts from the seeded random prompt tokens, the same ones every generation
    rows = d.rows
    d.start([1, 2, 3, 1, 2, 4, 1, 2, 3])
    assert d.rows == rows and set(rows[0]) <= {1, 2, 3, 4} and len(rows[0]) == 3 + 3 - 3


# --------------------------------------------------------------------------- acceptance
def test_tau_above_one_on_repetitive_output(tiny, refs):
    """Tiny random models fall into loops; the n-grams the Jacobi window collects then get accepted."""
    model, tok, prompts = tiny
    committed = calls = 0
    for ids, ref in zip(prompts, refs):
        g = run(model, Lookahead(bc=30), ids)
        assert g.new_ids == ref
        committed, calls = committed + sum(g.committed_per_step), calls + g.decode_calls
    assert committed / calls > 1.05


@pytest.mark.parametrize("bc,levels", [(10, [1, 1, 1, 1]), (30, [1, 2, 2, 2]), (60, [1, 2, 3, 3])])
def test_fill_levels_match_the_reference(tiny, bc, levels):
    """The prefill carries row 0 of the window, as the reference's first forward does, so the window fills
    one step earlier than without it: fill level 1 at the first decode step, full (N - 2) from step N - 2."""
    model, tok, prompts = tiny
    seen = []

    class Recording(Lookahead):
        def propose(self, tokens):
            seen.append(self.fill)
            return super().propose(tokens)

    g = run(model, Recording(bc=bc), prompts[0])
    assert seen[: len(levels)] == levels and set(seen[len(levels):]) <= {levels[-1]}, seen
    assert g.tokens_fed_max <= bc
