"""Uncertainty of a job's numbers, from its per-turn records.

Every pooled figure of a job is a ratio of sums over its prompt turns (τ = Σ committed / Σ calls, speedup =
Σ AR time / Σ method time, …). Its 95% interval comes from a bootstrap over turns: the turns are resampled
with replacement `N_BOOT` times and the ratio is recomputed on each resample; the interval is the 2.5th
and 97.5th percentile. The resamples are drawn from a generator seeded with `SEED` and depend only on the
number of turns, with turns in a fixed order (question id, turn), so two jobs over the same turns see the
very same resamples: their comparisons are paired (`paired_ratio`), which is what makes a difference
between two methods on the same prompts resolvable with few prompts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

N_BOOT = 2000
SEED = 0
LEVEL = 0.95

# pooled figures: name -> (numerator, denominator) per turn; the figure is Σ num / Σ den
POOLED = {
    "tau": (lambda r: r["decode_committed"], lambda r: r["decode_calls"]),
    "tokens_per_s": (lambda r: r["new_tokens"], lambda r: r["wall_s"]),
}
POOLED_VS_AR = {
    "speedup": (lambda r: r["ar_wall_s"], lambda r: r["wall_s"]),
    # prefill excluded on both sides: it is the same forward for every method
    "decode_speedup": (lambda r: r["ar_wall_s"] - r["ar_prefill_s"], lambda r: r["wall_s"] - r["prefill_s"]),
    "call_reduction": (lambda r: r["decode_calls"], lambda r: r["ar_decode_calls"]),  # reported as 1 - ratio
}


def turn_order(records: list[dict]) -> list[dict]:
    """Records in the fixed order every resample refers to: by (question id, turn)."""
    return sorted(records, key=lambda r: (str(r["question_id"]), r["turn"]))


def resamples(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n) turn indices drawn with replacement; the same for every job with n turns."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(values: np.ndarray) -> list[float] | None:
    """The central LEVEL (95%) percentile interval of bootstrap values (non-finite ones dropped); None if none."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.percentile(values, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
    return [float(lo), float(hi)]


def _ratio_of_sums(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return num[idx].sum(1) / den[idx].sum(1)


def intervals(records: list[dict], compared: bool) -> dict[str, list[float] | None]:
    """95% bootstrap intervals of the pooled figures (and, against AR, speedup, decode-only speedup and
    call reduction); with a single turn there is nothing to resample and every interval is None."""
    recs = turn_order(records)
    figures = POOLED | (POOLED_VS_AR if compared else {})
    if len(recs) < 2:
        return {name: None for name in figures}
    idx = resamples(len(recs))
    out = {}
    for name, (num, den) in figures.items():
        ratio = _ratio_of_sums(np.array([num(r) for r in recs], float), np.array([den(r) for r in recs], float), idx)
        out[name] = percentile_interval(1 - ratio if name == "call_reduction" else ratio)
        if name == "call_reduction" and out[name]:
            out[name] = sorted(out[name])
    return out


def paired_ratio(a: list[dict], b: list[dict], figure: str = "tau") -> dict | None:
    """The ratio of a pooled figure of job `a` to job `b` over the turns both have, with its paired 95%
    bootstrap interval (each resample takes the same turns from both) and whether the interval excludes 1."""
    num, den = (POOLED | POOLED_VS_AR)[figure]
    key = lambda r: (str(r["question_id"]), r["turn"])  # noqa: E731
    ka, kb = {key(r): r for r in a}, {key(r): r for r in b}
    common = sorted(set(ka) & set(kb))
    if not common:
        return None
    ra, rb = [ka[k] for k in common], [kb[k] for k in common]

    def arrays(recs):
        return np.array([num(r) for r in recs], float), np.array([den(r) for r in recs], float)

    (na, da), (nb, db) = arrays(ra), arrays(rb)
    point = (na.sum() / da.sum()) / (nb.sum() / db.sum())
    ci = None
    if len(common) >= 2:
        idx = resamples(len(common))
        ci = percentile_interval(_ratio_of_sums(na, da, idx) / _ratio_of_sums(nb, db, idx))
    return {"ratio": float(point), "ci": ci, "n_turns": len(common),
            "excludes_1": bool(ci and (ci[0] > 1 or ci[1] < 1))}


def acceptance_by_depth(accepted_hist: dict, leaf_hist: dict | None = None) -> list[float]:
    """Per draft position d = 1, 2, …: the rate at which depth d was accepted in the steps where depth
    d - 1 was and had a draft below it (vLLM's per-position acceptance). `accepted_hist`: steps by the
    number of drafts accepted; `leaf_hist`: of those, the steps whose deepest accepted node had no child (the
    tree ended there: depth d was not offered)."""
    hist = Counter({int(k): v for k, v in accepted_hist.items()})
    leaf = Counter({int(k): v for k, v in (leaf_hist or {}).items()})
    if not hist:
        return []
    rates = []
    for d in range(1, max(hist) + 2):  # one past the deepest accepted: its rate is 0 where it was offered
        accepted = sum(v for a, v in hist.items() if a >= d)
        offered = accepted + hist[d - 1] - leaf[d - 1]
        if offered <= 0:
            break
        rates.append(accepted / offered)
    return rates
