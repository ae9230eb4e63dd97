"""Intervals, paired comparisons and per-position acceptance (mtp/stats.py) on hand-made records."""

import random

import pytest

from mtp.stats import acceptance_by_depth, intervals, paired_ratio, resamples


def _records(taus, seed=0, ar_wall=1.0):
    """One record per turn with τ close to the given values (calls 20 each) and times that give speedup
    ar_wall / wall."""
    rng = random.Random(seed)
    out = []
    for i, t in enumerate(taus):
        calls = 20
        out.append({"question_id": i, "turn": 0, "decode_calls": calls, "decode_committed": round(t * calls),
                    "new_tokens": round(t * calls) + 1, "wall_s": 0.5 + rng.random() * 0.1, "prefill_s": 0.05,
                    "ar_wall_s": ar_wall, "ar_prefill_s": 0.05, "ar_decode_calls": round(t * calls)})
    return out


def test_the_interval_holds_the_pooled_value_and_narrows_with_more_turns():
    rng = random.Random(1)
    few = _records([1.5 + rng.gauss(0, 0.3) for _ in range(8)])
    many = _records([1.5 + rng.gauss(0, 0.3) for _ in range(200)])
    for recs in (few, many):
        tau = sum(r["decode_committed"] for r in recs) / sum(r["decode_calls"] for r in recs)
        lo, hi = intervals(recs, True)["tau"]
        assert lo <= tau <= hi
    width = [intervals(r, True)["tau"][1] - intervals(r, True)["tau"][0] for r in (few, many)]
    assert width[1] < width[0] / 2
    assert intervals(few[:1], True)["tau"] is None  # one turn: nothing to resample


def test_resamples_are_the_same_for_every_job_with_the_same_turns():
    assert (resamples(30) == resamples(30)).all() and resamples(30).shape == (2000, 30)


def test_paired_ratio_resolves_a_small_consistent_difference():
    """Method a is 5% above b on every turn while turns vary a lot: unpaired intervals overlap, the paired
    ratio's interval excludes 1."""
    rng = random.Random(2)
    base = [1.2 + rng.random() for _ in range(12)]
    a, b = _records([t * 1.05 for t in base]), _records(base)
    ia, ib = intervals(a, False)["tau"], intervals(b, False)["tau"]
    assert ia[0] < ib[1]  # unpaired: the intervals overlap
    cmp = paired_ratio(a, b, "tau")
    assert cmp["excludes_1"] and cmp["ci"][0] > 1.0 and cmp["ratio"] == pytest.approx(1.05, abs=0.01)
    assert paired_ratio(b, b, "tau")["ratio"] == 1.0 and not paired_ratio(b, b, "tau")["excludes_1"]


def test_acceptance_by_depth_by_hand():
    """10 steps: 4 accepted nothing, 3 accepted 1 draft, 3 accepted 2 (1 of them at a leaf of depth 2, and
    1 of the 1-draft steps at a leaf): depth 1 accepted in 6 of 10; depth 2 in 3 of the 6 - 1 = 5 that had
    a draft below; depth 3 in 0 of the 3 - 1 = 2."""
    rates = acceptance_by_depth({0: 4, 1: 3, 2: 3}, {1: 1, 2: 1})
    assert rates == pytest.approx([6 / 10, 3 / 5, 0 / 2])
    assert acceptance_by_depth({}) == []
