"""STAND: greedy output identical to AR at any bc and option, blocks within bc, the store's merge rule and
4 -> 3 -> 2 backoff, the fallback tree rule, sampling coupled to AR, and the tree-fitting command."""

import functools
import itertools
import json

import pytest

from experiments.fit_trees import main as fit_main
from baselines.stand import Stand, bfs_order, check_shape, merge, rule_tree
from mtp.drafting import load_fitted
from mtp.errors import ConfigError
from mtp.loop import Drafter

from .conftest import decode

N_NEW = 24


pytestmark = pytest.mark.usefixtures("one_thread")
run = functools.partial(decode, n=N_NEW, setup=False)  # tests set drafters up themselves (persisting state)


class Checked(Stand):
    """Stand that asserts every proposal is a valid tree within bc."""

    def propose(self, tokens):
        block = super().propose(tokens)
        assert block.size == block.n_tree <= self.bc
        assert all(0 <= p < i for i, p in enumerate(block.parents) if i)
        self.max_fed = max(getattr(self, "max_fed", 0), block.size)
        return block


@pytest.mark.parametrize("bc,persist,gumbel", itertools.product((10, 17, 30, 60), (False, True), (False, True)))
def test_greedy_equals_ar(tiny, refs, bc, persist, gumbel):
    model, tok, prompts = tiny
    d = Checked(bc=bc, persist=persist, gumbel=gumbel, tree="rule")
    d.setup(model)
    for _ in range(2):  # twice through the prompts: with persist the second pass drafts from a full store
        for ids, ref in zip(prompts, refs):
            g = run(model, d, ids)
            assert g.new_ids == ref
            assert g.tokens_fed_max <= bc
    assert len(d.paths) == bc - 1


def test_persist_store_makes_repeats_cheap(tiny, refs):
    """A prompt decoded again with persist: the store holds every context's greedy next token, so deep
    paths are accepted; without persist the second pass starts from an empty store."""
    model, tok, prompts = tiny
    taus = {}
    for persist in (False, True):
        d = Stand(bc=30, persist=persist, prompt_seed=False, tree="rule")
        d.setup(model)
        run(model, d, prompts[0])
        g = run(model, d, prompts[0])
        assert g.new_ids == refs[0]
        taus[persist] = sum(g.committed_per_step) / g.decode_calls
    assert taus[True] > 2.0 and taus[True] > taus[False] + 1.0


def test_eos_mid_block(tiny, refs):
    model, tok, prompts = tiny
    d = Stand(bc=30, persist=True, tree="rule")
    d.setup(model)
    for ids, ref in list(zip(prompts, refs)) * 2:
        eos = ref[len(ref) // 2]
        g = run(model, d, ids, eos=[eos])
        assert g.new_ids == ref[: ref.index(eos) + 1] and g.stop == "eos"


def test_sampling_reproduces_ar_samples(tiny):
    """T > 0 without the rejection verifier: drafts come from the drafter's own RNG (Gumbel), so
    sample-matching returns exactly AR's samples."""
    model, tok, prompts = tiny
    for seed in range(3):
        for ids in prompts[:2]:
            ar = run(model, Drafter(), ids, temperature=1.0, seed=seed).new_ids
            d = Stand(bc=30, temperature=1.0, persist=True, tree="rule", seed=seed, rejection=False)
            assert d.gumbel
            d.setup(model)
            for _ in range(2):
                assert run(model, d, ids, temperature=1.0, seed=seed).new_ids == ar


def test_sampling_with_rejection_verifier_runs_and_accepts(tiny):
    """T > 0 with the rejection verifier (default): blocks carry q and drafts still get accepted; the
    verifier's exactness is tested statistically in tests/test_loop.py."""
    model, tok, prompts = tiny
    d = Stand(bc=30, temperature=1.0, persist=True, tree="rule")
    assert d.rejection
    d.setup(model)
    seen_q, propose = [], d.propose

    def spy(tokens):
        block = propose(tokens)
        seen_q.append(bool(block.draws))
        return block

    d.propose = spy
    committed = calls = 0
    for ids in prompts * 2:
        g = run(model, d, ids, temperature=1.0)
        committed, calls = committed + sum(g.committed_per_step), calls + g.decode_calls
    assert any(seen_q) and committed / calls > 1.0


def test_merge_rule():
    ids1, p1 = list(range(10)), [0.3, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01]
    e = merge(None, ids1, p1, top_n=10)
    assert e == (ids1, p1, 1)  # first observation: the distribution as given, k = 1
    e = merge(e, [10, 0, 11], [0.5, 0.4, 0.1], top_n=10)  # k = 1: old / 2 + new / 2
    got = dict(zip(e[0], e[1]))
    assert e[2] == 2 and len(e[0]) == 10
    assert got[0] == pytest.approx(0.35) and got[10] == pytest.approx(0.25) and got[11] == pytest.approx(0.05)
    assert got[1] == pytest.approx(0.1) and 9 not in got and 8 not in got  # re-truncated to the top 10
    assert e[0][:3] == [0, 10, 1] and e[1] == sorted(e[1], reverse=True)
    e = merge(e, [10], [0.9], top_n=10)  # k = 2: old 2/3 + new 1/3
    assert dict(zip(e[0], e[1]))[10] == pytest.approx(0.25 * 2 / 3 + 0.3) and e[2] == 3
    assert merge(None, [5, 4, 3], [0.2, 0.2, 0.1], top_n=2)[0] == [4, 5]  # ties: smaller id first


def test_backoff_4_3_2_and_prompt_seed():
    d = Stand(bc=10, tree="rule", backfill=False)
    d.add((7, 1, 2, 3), [40, 41], [0.6, 0.3])  # fills 4-, 3- and 2-gram entries ending at ...2, 3
    d.add((9, 2, 3), [30], [0.9])  # 3- and 2-gram entries for (2, 3), (3,) -> merged
    d.add((8, 3), [20], [0.7])
    assert set(d.store) == {(7, 1, 2, 3), (1, 2, 3), (2, 3), (9, 2, 3), (8, 3)}
    assert d.children((7, 1, 2, 3), 2)[0] == [40, 41]  # 4-gram hit
    assert d.children((5, 9, 2, 3), 2)[0] == [30]  # no 4-gram: the 3-gram (9, 2, 3)
    assert d.children((5, 6, 2, 3), 3)[0] == [30, 40, 41]  # 2-gram (2, 3): {40: .6, 41: .3} merged with {30: .9}
    assert d.store[(2, 3)][2] == 2 and d.store[(2, 3)][1] == pytest.approx([0.45, 0.3, 0.15])
    assert d.children((5, 6, 7, 8, 3), 2)[0] == [20]  # 2-gram (8, 3)
    assert d.children((1, 2, 4), 2)[0] == []  # nothing stored: the node gets no children
    d.backfill = True
    assert d.children((9, 2, 3), 4)[0] == [30, 40, 41]  # the 3-gram's one entry, then the 2-gram's
    # prompt seed: counts after the logit store of the same order, before shorter logit contexts
    d.start([1, 2, 3, 50, 5, 2, 3, 50, 6, 2, 3, 51])
    assert d.store == {}  # persist=False: a new generation starts with an empty store
    assert d.children((1, 2, 3), 2)[0] == [50, 51]  # 3-gram count (1, 2, 3) -> 50, then 2-gram (2, 3): 50 x2, 51
    d.add((1, 2, 3), [60], [0.5])
    assert d.children((1, 2, 3), 2)[0] == [60, 50]  # logit store first, backfilled from the counts


def test_rule_tree_and_shapes():
    for n in (1, 9, 16, 29, 59, 80, 200):
        t = rule_tree(n)
        assert len(t) == len(set(t)) == n
        check_shape(t)
        for p in t:  # sibling-closed too: rank r+1 only after rank r
            assert p[-1] == 0 or p[:-1] + (p[-1] - 1,) in set(t)
    assert rule_tree(9) == [(0,), (1,), (0, 0), (2,), (0, 1), (1, 0), (0, 0, 0), (3,), (0, 2)]
    assert rule_tree(9) == rule_tree(30)[:9]  # nested
    assert max(len(p) for p in rule_tree(625, max_depth=8)) == 8
    with pytest.raises(ConfigError, match="prefix-closed"):
        Stand(bc=10, tree=[[0], [1, 0]])
    with pytest.raises(ConfigError, match="exceed bc=3"):
        Stand(bc=3, tree=[[0], [1], [0, 0]])
    with pytest.raises(ConfigError, match="too small"):
        Stand(bc=1)
    assert len(Stand(bc=2).paths) == 1
    assert Stand(bc=17, model_name="no_such_model").tree_source == "rule"


def test_fit_command_on_tiny_model(tmp_path):
    prompts = tmp_path / "q.jsonl"
    with open(prompts, "w") as f:
        for i, cat in enumerate(["a", "a", "a", "b", "c"]):
            f.write(json.dumps({"question_id": i, "category": cat, "turns": [f"Say it again and again: {cat} {i}"]}) + "\n")
    res = fit_main(["model=tiny_qwen3", "--methods", "stand", "--bc", "10", "17", "--prompts", str(prompts),
                    "--stand-nodes", "80", "--max-new-tokens", "40", "--out-dir", str(tmp_path)])["stand"]
    out = tmp_path / "stand" / "tiny_qwen3.json"
    data = json.loads(out.read_text())
    h = data["header"]
    assert h["model"] == "tiny_qwen3" and h["made_by"].startswith("python -m experiments.fit_trees")
    assert h["prompts"]["question_ids"] == [1, 2, 3, 4] and h["prompts"]["split"] == "calib" and h["date"]
    assert str(tmp_path) not in out.read_text()  # no machine path in the file
    assert sum(data["counts"]) > 0
    for bc in (10, 17):
        tree = [tuple(p) for p in data["trees"][str(bc)]]
        assert len(tree) == len(set(tree)) == bc - 1
        check_shape(tree)  # prefix-closed and gap-free in rank
        assert tree == bfs_order(res["ranking"][: bc - 1])
    for bc in (2, 10, 17, 30):  # any bc: trees[bc], else the first bc - 1 of the (prefix-closed) ranking
        tree = load_fitted(out, bc)
        assert len(tree) == bc - 1
        check_shape(tree)
    # loop mode counts accepted rows of real steps
    res = fit_main(["model=tiny_qwen3", "--methods", "stand", "--bc", "10", "--prompts", str(prompts), "--stand-nodes",
                    "40", "--max-new-tokens", "20", "--stand-mode", "loop", "--out-dir", str(tmp_path / "loop")])["stand"]
    assert len(res["trees"]["10"]) == 9 and res["header"]["steps"] > 0


def test_fit_refuses_the_eval_split(tmp_path):
    with pytest.raises(ConfigError, match="calib split only"):
        fit_main(["model=tiny_qwen3", "task.split=eval", "--out-dir", str(tmp_path)])


def test_ranking_is_prefix_closed_and_gap_free():
    """Counts that favour rank 4 over rank 3 (as happens with few samples) still give gap-free trees."""
    from experiments.fit_trees import rank_nodes

    paths = rule_tree(40)
    counts = {p: 100 - 10 * len(p) for p in paths} | {(0, 4): 95, (0, 3): 1, (2,): 0}
    ranked = rank_nodes(paths, counts, gap_free=True)
    assert sorted(ranked) == sorted(paths)
    for n in range(1, len(ranked) + 1):
        check_shape(ranked[:n])
    assert ranked.index((0, 3)) < ranked.index((0, 4))
    loose = rank_nodes(paths, counts, gap_free=False)  # Token Recycling's: prefix-closed only
    assert loose.index((0, 4)) < loose.index((0, 3))
    for n in range(1, len(loose) + 1):
        assert all(len(p) == 1 or p[:-1] in set(loose[:n]) for p in loose[:n])


def test_gapped_trees_are_refused():
    with pytest.raises(ConfigError, match="gap in rank"):
        Stand(bc=10, tree=[[0], [1], [0, 0], [0, 2]])


def test_fitted_tree_file_is_used(tiny, refs, tmp_path):
    model, tok, prompts = tiny
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"header": {}, "trees": {"10": [[0], [0, 0], [0, 0, 0]]},
                             "ranking": [[0], [1], [0, 0], [2], [0, 0, 0], [1, 0]]}))
    d = Stand(bc=10, tree=str(f))
    assert d.paths == [(0,), (0, 0), (0, 0, 0)]
    assert Stand(bc=4, tree=str(f)).paths == [(0,), (1,), (0, 0)]
    d.setup(model)
    assert run(model, d, prompts[0]).new_ids == refs[0]


def test_sampling_job_reports_lossless_in_distribution(tmp_path):
    """At T > 0 STAND's drafts are random draws, so its sampled ids differ from AR's by design: the job
    says 'in distribution' (the chi-square tests check that) instead of reporting a false mismatch."""
    from run import run_any

    from .conftest import compose_cfg

    cfg = compose_cfg(["model=tiny_llama", "method=stand", "temperature=1.0", "task.limit=2", "max_new_tokens=12",
                       "bc=10", "wandb.mode=disabled"])
    summary, text = run_any(cfg, tmp_path)
    assert summary["lossless"] == "in distribution" and summary["n_mismatches"] is None
    assert "in distribution" in text and "by design" in text
    greedy, _ = run_any(compose_cfg(["model=tiny_llama", "method=stand", "task.limit=2", "max_new_tokens=12", "bc=10"]),
                        tmp_path / "greedy")
    assert greedy["lossless"] == "exact"  # at T = 0 the ids are compared as for every method
