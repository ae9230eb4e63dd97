"""Per-turn records -> job summary. Every derived number comes from `records.jsonl` rows.

τ = Σ tokens committed by decode steps / Σ decode calls (the prefill's first token is in neither), so
AR has τ = 1 exactly. Speedup = Σ AR wall time / Σ method wall time over the same prompt turns, both
measured in the same job, interleaved per prompt; `decode_speedup` leaves the prefill (the same forward
for both) out of both sides, and `speedup_specbench` is Spec-Bench's definition, the ratio of the mean
per-turn throughputs. `bound` = τ · t_call(AR) / t_call(method), from the model-call times inside the
loop: the decode-only speedup a loop with no cost of its own would reach, to compare with
`decode_speedup`. Loop overhead = decode time (wall − prefill) / time in the model calls − 1: what
drafting, verification and the cache cost beside the forwards. `ci` holds 95% bootstrap intervals over
turns (`mtp.stats`); `acceptance_by_depth` the per-position acceptance rates.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from mtp.lossless import lossless_fields
from mtp.stats import acceptance_by_depth, intervals


def first_mismatch(ids: list[int], ref: list[int]) -> int | None:
    """The first position where `ids` and `ref` differ, a missing token included; None if identical."""
    n = min(len(ids), len(ref))
    pos = next((i for i in range(n) if ids[i] != ref[i]), None)
    if pos is None and len(ids) != len(ref):
        pos = n
    return pos


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(records: list[dict]) -> dict:
    """Pooled metrics of a job's records (all of them must come from one model/method/bc)."""
    if not records:
        return {"n_turns": 0}
    calls = sum(r["decode_calls"] for r in records)
    committed = sum(r["decode_committed"] for r in records)
    new = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    hist: Counter = Counter()
    for r in records:
        hist.update({int(k): v for k, v in r["accept_hist"].items()})
    compared = all("ar_wall_s" in r for r in records)
    out = {
        "tau": _ratio(committed, calls),
        "tokens_per_s": _ratio(new, wall),
        "decode_calls": calls,
        "prefill_calls": sum(r["prefill_calls"] for r in records),
        "new_tokens": new,
        "max_tokens_per_forward": max(r["tokens_fed_max"] for r in records),
        "mean_tokens_per_forward": _ratio(sum(r["tokens_fed_mean"] * r["decode_calls"] for r in records), calls),
        "accept_hist": dict(sorted(hist.items())),
        "wall_s": wall,
        "n_prompts": len({r["question_id"] for r in records}),
        "n_turns": len(records),
        "stops": dict(sorted(Counter(r["stop"] for r in records).items())),  # why each turn ended
        "compared_with_ar": compared,
    }
    if all("forward_s" in r for r in records):  # the loop's own cost per decode step, relative to the model call
        fwd = sum(r["forward_s"] for r in records)
        decode = wall - sum(r["prefill_s"] for r in records)
        out["loop_overhead"] = _ratio(decode, fwd) - 1 if fwd else None
        out["step_s"] = _ratio(decode, calls)  # per decode step: the model call and the loop's own work
        out["model_call_s"] = _ratio(fwd, calls)  # per decode step: the model call alone
    accepted, leaf = Counter(), Counter()
    for r in records:
        accepted.update({int(k): v for k, v in r.get("accepted_hist", {}).items()})
        leaf.update({int(k): v for k, v in r.get("leaf_hist", {}).items()})
    out["acceptance_by_depth"] = acceptance_by_depth(accepted, leaf)
    if compared:
        ar_calls = sum(r["ar_decode_calls"] for r in records)
        ar_wall = sum(r["ar_wall_s"] for r in records)
        out |= {
            "speedup": _ratio(ar_wall, wall),
            "ar_tokens_per_s": _ratio(sum(r["ar_new_tokens"] for r in records), ar_wall),
            "ar_decode_calls": ar_calls,
            "call_reduction": 1 - calls / ar_calls if ar_calls else None,
            "ar_model_call_s": _ratio(sum(r.get("ar_forward_s", 0.0) for r in records), ar_calls),
            "decode_speedup": _ratio(ar_wall - sum(r["ar_prefill_s"] for r in records),
                                     wall - sum(r["prefill_s"] for r in records)),
            "speedup_specbench": _ratio(sum(r["new_tokens"] / r["wall_s"] for r in records),
                                        sum(r["ar_new_tokens"] / r["ar_wall_s"] for r in records)),
            **lossless_fields(records),  # exact / numeric_ties / false, and the count of each class
            "n_mismatches": sum(r["matches_ar"] is False for r in records),
        }
        if any(r.get("lossless_check") == "distribution" for r in records):  # random drafts: no id comparison
            out |= {"lossless": "in distribution", "n_mismatches": None, "n_defects": None, "n_numeric_ties": None}
        if all("wall_s_repeats" in r for r in records):  # repeats > 1: the speed ratio of every repeat
            n = min(len(r["wall_s_repeats"]) for r in records)
            ratios = sorted(sum(r["ar_wall_s_repeats"][k] for r in records) / sum(r["wall_s_repeats"][k] for r in records)
                            for k in range(n))
            out["speedup_repeats"] = {"n": n, "median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
        if out.get("model_call_s") and out["ar_model_call_s"]:
            out["forward_cost"] = out["model_call_s"] / out["ar_model_call_s"]  # one block forward in 1-token forwards
            out["bound"] = out["tau"] / out["forward_cost"]
    else:  # no AR twin in this job: nothing measured side by side
        out |= {"speedup": None, "ar_tokens_per_s": None, "call_reduction": None, "lossless": None}
    out["ci"] = intervals(records, compared)
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out["per_task_tau"] = {
        t: _ratio(sum(r["decode_committed"] for r in rs), sum(r["decode_calls"] for r in rs))
        for t, rs in sorted(by_task.items())
    }
    out["per_task_tau_ci"] = {t: intervals(rs, False)["tau"] for t, rs in sorted(by_task.items())}
    out["per_task_acceptance_by_depth"] = {
        t: acceptance_by_depth(sum((Counter({int(k): v for k, v in r.get("accepted_hist", {}).items()}) for r in rs), Counter()),
                               sum((Counter({int(k): v for k, v in r.get("leaf_hist", {}).items()}) for r in rs), Counter()))
        for t, rs in sorted(by_task.items())
    }
    return out
