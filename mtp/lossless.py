"""Losslessness classes, right in every dtype.

A greedy method is lossless when its ids are AR's. In fp32 that is checked exactly. In bf16 or fp16 a tree
forward and AR's one-token forwards round differently, so where AR's top two logits nearly tie the method can
take AR's second choice with a verifier that is correct. At a turn's first divergence the runner records the
position, both tokens and AR's top-2 logit gap there (`mtp.runner.first_difference`), and `classify` names it:

- `numeric_tie`: the dtype has a tie tolerance, AR's recomputed top-2 gap is within it, and the two tokens
  are AR's top two (the method took the other one);
- `defect`: anything else, and every divergence in fp32;
- `after_divergence`: a later turn whose prompt already differs (an earlier turn diverged), not compared.

A job's `lossless` is then `exact` (no divergence), `numeric_ties` (every divergence a tie) or `false` (any
defect), with the counts beside it; at T > 0 with random drafts it stays "in distribution".

`TIE_GAP[dtype]` is measured, not assumed: `python -m experiments.ties model=smollm2_135m model.dtype=...`
gives, over 13 Spec-Bench prompts x 32 tokens, the largest shift of AR's top-2 gap between a tree forward and
AR's forwards plus that between the check's recompute and AR's forwards (`tie_gap_bound`); the tolerance is
that sum times `MARGIN`. A verifier that accepts a wrong token still shows as a defect: its token is rarely
AR's second choice, and never one a rounding shift could have put first (tests/test_lossless.py).
"""

from __future__ import annotations

MARGIN = 2.0
# tie_gap_bound measured by `python -m experiments.ties model=smollm2_135m model.dtype=<dtype>` (13 prompts x 32
# tokens, bc 30; CPU, torch 2.13.0): bf16 tree shift ≤ 0.625 + recompute shift ≤ 0.625 (p99 0.25 each; logits
# themselves move by up to 1.33); fp16 0.031 + 0.0625. A GPU rounds with other kernels: its study re-measures.
MEASURED_GAP_SHIFT = {"bfloat16": 1.25, "float16": 0.09375}
TIE_GAP = {dtype: MARGIN * shift for dtype, shift in MEASURED_GAP_SHIFT.items()}

CLASSES = ("numeric_tie", "defect", "after_divergence")


def classify(first_diff: dict | None, dtype: str) -> str | None:
    """The class of a turn's first divergence from AR (None: no divergence)."""
    if first_diff is None:
        return None
    if first_diff.get("position") is None:  # the prompt already differed
        return "after_divergence"
    tol, gap = TIE_GAP.get(dtype), first_diff.get("top2_gap")
    pair = {first_diff.get("method_token"), first_diff.get("ar_token")}
    if tol is not None and gap is not None and gap <= tol and pair == set(first_diff.get("top2_tokens") or ()):
        return "numeric_tie"
    return "defect"


def lossless_fields(records: list[dict]) -> dict:
    """`lossless` (exact / numeric_ties / false) and the count of each class over a job's compared turns. A
    record without a class (written before classes existed) that differs from AR counts as a defect."""
    counts = dict.fromkeys(CLASSES, 0)
    for r in records:
        if r.get("matches_ar") is False:
            counts[(r.get("first_diff") or {}).get("class") or "defect"] += 1
    lossless = "false" if counts["defect"] else "numeric_ties" if counts["numeric_tie"] else "exact"
    return {"lossless": lossless, "n_defects": counts["defect"], "n_numeric_ties": counts["numeric_tie"],
            "n_after_divergence": counts["after_divergence"]}


def lossless_label(summary) -> str | None:
    """`exact`, `numeric_ties (3)`, `false (2 defects)` or `in distribution`, from a summary (or a results row)."""
    get = summary.get
    value = get("lossless")
    if value == "numeric_ties":
        return f"numeric_ties ({get('n_numeric_ties')})"
    if value == "false":
        return f"false ({get('n_defects')} defects)" if get("n_defects") is not None else "false"
    if isinstance(value, bool):  # a summary written before the classes
        return "exact" if value else "false"
    return value if value is None or isinstance(value, str) else str(value)
