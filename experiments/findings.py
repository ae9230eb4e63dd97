"""The paper's claims, checked on this harness's runs: for each claim, our measured effect, its 95% paired
bootstrap interval over prompt turns (`mtp.stats`), and a verdict.

    python -m experiments.findings                       # runs the experiments it needs, then writes the table
    python -m experiments.findings --jobs 2              # two single-thread job streams at once (2 cores)
    python -m experiments.findings task.per_category=2   # extra overrides for every job (a larger sample)
    python -m experiments.findings --report-only         # the table from the runs already there

The runs (`EXPERIMENTS`) are the paper's experiment sweeps narrowed to what the claims need, at a small CPU scale
(`SCALE`: SmolLM2, the first question of each Spec-Bench category on the eval split, first turns, 32 new tokens;
more for the claims about a few tasks),
into `results/findings/<experiment>/`; a rerun skips the jobs already complete. The table is
`results/findings/report/findings.md` beside the rest of the report.

A claim compares two runs on the same turns, as a ratio of their pooled figures (τ, or the speedup vs AR)
or, for Figure 2, a difference of cosines. Verdicts, at 95%:
- "A > B" (ratio above 1): holds when the interval's lower end is above 1, contradicted when its upper end is
  below 1, unresolved otherwise ("A < B" the other way round);
- "A ≈ B": holds when the interval lies within 1 ± `EQUIVALENCE` (3%), contradicted when it lies wholly
  outside, unresolved otherwise.
Below `MIN_TURNS` (10) turns a percentile bootstrap interval is too narrow to trust (two turns with equal
ratios give a zero-width interval), so a claim tested on fewer turns stays unresolved.
For an unresolved claim, "turns to resolve" estimates how many prompt turns the interval needs: it shrinks as
1/√n around the same effect, so n · (half-width / distance from the effect to the threshold)².
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import paper
from experiments.results import job_records
from experiments.tables import METHOD_LABEL, methods_in, ok_runs
from mtp.stats import paired_ratio, percentile_interval, resamples, turn_order

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
EQUIVALENCE = 0.03  # "A ≈ B": the ratio within 1 ± 3%
MIN_TURNS = 10  # a percentile bootstrap over fewer turns is too narrow to trust: no verdict below it
SCALE = ["model=smollm2_135m", "task.split=eval", "task.per_category=1", "task.turns=1", "max_new_tokens=32"]
# experiment -> invocations, each the overrides that narrow its sweep (one invocation per bc where the sweep has
# several, so that --jobs can spread them); the scale's and the user's overrides come before these
EXPERIMENTS = {
    "table1": [["bc=30"], ["bc=60"]],
    "table3_masks": [[]],
    "table5_init": [[]],
    # the paper's claim is at bc 60 (1.630 dynamic vs 1.631 best static)
    "table2_dynamic": [["+esp_tree=bc60_15_4,bc60_12_7,bc60_10_9,bc60_8_11,bc60_6_13,bc60_dynamic"]],
    "pruner": [["bc=10"], ["bc=30"], ["bc=60"]],
    "table4_impl": [["bc=30"], ["bc=60"]],
    # Figure 4's copy-task claim needs more summarization and RAG turns than one or two questions per category
    "fig4": [["method=pld,esp", "bc=30", "task.categories=[summarization,rag]", "task.per_category=10"]],
    # alignment is one generation and one forward per turn: 10 questions of each of its 2 categories
    "fig2": [["task.per_category=10"]],
}
COLUMNS = ["claim", "paper", "comparison", "model", "bc", "measured", "95% interval", "verdict", "turns",
           "turns to resolve"]


def verdict(point: float, ci, kind: str, threshold: float = 1.0, n: int = MIN_TURNS) -> str:
    """holds / contradicted / unresolved for `kind` "gt" (effect above threshold), "lt" (below) or "approx"
    (within threshold ± EQUIVALENCE); unresolved below MIN_TURNS turns, whatever the interval."""
    if not ci or n < MIN_TURNS:
        return "unresolved"
    lo, hi = ci
    if kind == "gt":
        return "holds" if lo > threshold else "contradicted" if hi < threshold else "unresolved"
    if kind == "lt":
        return "holds" if hi < threshold else "contradicted" if lo > threshold else "unresolved"
    if kind == "approx":
        a, b = threshold - EQUIVALENCE, threshold + EQUIVALENCE
        return "holds" if a <= lo and hi <= b else "contradicted" if hi < a or lo > b else "unresolved"
    raise ValueError(kind)


def turns_to_resolve(point: float, ci, n: int, kind: str, threshold: float = 1.0) -> int | float | None:
    """For an unresolved claim, the turns at which an interval shrinking as 1/√n around the same effect would
    clear the threshold (∞ when the effect sits on it); None when the claim is resolved or there is no interval."""
    if verdict(point, ci, kind, threshold, n) != "unresolved":
        return None
    if not ci or verdict(point, ci, kind, threshold) != "unresolved":  # too few turns to trust the interval
        return MIN_TURNS
    half = (ci[1] - ci[0]) / 2
    distance = abs(point - threshold) if kind != "approx" else abs(EQUIVALENCE - abs(point - threshold))
    return math.inf if distance == 0 else max(n + 1, MIN_TURNS, math.ceil(round(n * (half / distance) ** 2, 6)))


def _needed(n) -> str:
    return "" if n is None else "∞" if n == math.inf else str(n)


def claim_row(claim: str, paper_says: str, comparison: str, model, bc, cmp: dict | None, kind: str,
              threshold: float = 1.0) -> dict:
    if cmp is None:
        return {}
    point, ci, n = cmp["ratio"], cmp["ci"], cmp["n_turns"]
    return {"claim": claim, "paper": paper_says, "comparison": comparison, "model": model, "bc": bc, "measured": point,
            "95% interval": f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "", "verdict": verdict(point, ci, kind, threshold, n),
            "turns": n, "turns to resolve": _needed(turns_to_resolve(point, ci, n, kind, threshold))}


def _sweeps(df: pd.DataFrame, by):
    """(key, jobs) for each `by` group (model, or model and bc) of a sweep's jobs; none when it has none."""
    return df.groupby(by, sort=True) if len(df) else []


def _one(df: pd.DataFrame, **eq):
    for key, value in eq.items():
        df = df[df[key] == value]
    return df.iloc[-1] if len(df) else None


def _ratio(a, b, figure: str = "tau", task: str | tuple | None = None) -> dict | None:
    if a is None or b is None:
        return None
    ra, rb = job_records(a), job_records(b)
    if task is not None:  # a task, or several pooled
        tasks = {task} if isinstance(task, str) else set(task)
        ra, rb = [r for r in ra if r["task"] in tasks], [r for r in rb if r["task"] in tasks]
    return paired_ratio(ra, rb, figure)


def _paper_ratio(x: float, y: float, where: str) -> str:
    return f"{x:.2f} / {y:.2f} = {x / y:.3f} ({where})"


def table1_claims(runs: pd.DataFrame) -> list[dict]:
    """Table 1: ESP's τ above LADE's, PLD's and STAND's at bc 30 and 60."""
    rows = []
    for (model, bc), g in _sweeps(ok_runs(runs, ["table1"]), ["model", "bc"]):
        ref = paper.TABLE1.get(("llama3_8b", bc), {})
        for other in ("lade", "pld", "stand"):
            says = _paper_ratio(ref["esp"][0], ref[other][0], "Llama-3.1-8B") if ref else ""
            rows.append(claim_row("ESP τ > rival τ (Table 1)", says, f"ESP / {METHOD_LABEL[other]} τ", model, bc,
                                  _ratio(_one(g, method="esp"), _one(g, method=other)), "gt"))
    return rows


def bc_claims(runs: pd.DataFrame) -> list[dict]:
    """Table 1: ESP's τ rises from bc 30 to bc 60 (a larger block buys a wider tree), on the same turns."""
    rows = []
    ref = {bc: paper.TABLE1[("llama3_8b", bc)]["esp"][0] for bc in (30, 60)}
    for model, g in _sweeps(ok_runs(runs, ["table1"]), "model"):
        rows.append(claim_row("ESP τ rises with bc (Table 1)", _paper_ratio(ref[60], ref[30], "Llama-3.1-8B"),
                              "ESP τ bc 60 / bc 30", model, "30 → 60",
                              _ratio(_one(g, method="esp", bc=60), _one(g, method="esp", bc=30)), "gt"))
    return rows


def table3_claims(runs: pd.DataFrame) -> list[dict]:
    """Table 3: three masks per token hurt against one or two (bc 60)."""
    rows = []
    t3 = {k: v["llama3_8b"] for k, v in paper.TABLE3.items()}
    for model, g in _sweeps(ok_runs(runs, ["table3_masks"]), "model"):
        three = _one(g, m_widths="[7, 5, 2]")
        for widths, k in (("[29]", 1), ("[15, 4]", 2)):
            rows.append(claim_row("3 masks hurt (Table 3)", _paper_ratio(t3[3], t3[k], "Llama-3.1-8B"),
                                  f"τ [7,5,2] / τ {widths.replace(' ', '')}", model, 60,
                                  _ratio(three, _one(g, m_widths=widths)), "lt"))
    return rows


def table5_claims(runs: pd.DataFrame) -> list[dict]:
    """Table 5: mean init ≥ sample init ≥ last-k init."""
    rows = []
    t5 = {k: v["llama3_8b"] for k, v in paper.TABLE5.items()}
    for model, g in _sweeps(ok_runs(runs, ["table5_init"]), "model"):
        for a, b in (("mean", "sample"), ("sample", "last_k")):
            rows.append(claim_row("mean ≥ sample ≥ last-k init (Table 5)", _paper_ratio(t5[a], t5[b], "Llama-3.1-8B"),
                                  f"τ {a} / τ {b}", model, 60, _ratio(_one(g, m_init=a), _one(g, m_init=b)), "gt"))
    return rows


def table2_claims(runs: pd.DataFrame) -> list[dict]:
    """Table 2: the dynamic tree is as good as the best static one. The best static tree is picked by its point
    τ on the same turns, which favours the static side (a selection the paper's table makes too)."""
    rows = []
    for (model, bc), g in _sweeps(ok_runs(runs, ["table2_dynamic"]), ["model", "bc"]):
        static = g[g.m_tree == "static"]
        if not len(static):
            continue
        best = static.loc[static.tau.idxmax()]
        says = (_paper_ratio(paper.TABLE2_BC60["dynamic"], paper.TABLE2_BC60["best static"], "model not stated")
                if bc == 60 else "")
        rows.append(claim_row("dynamic ≈ best static tree (Table 2)", says,
                              f"τ dynamic / τ static {best.m_widths.replace(' ', '')}", model, bc,
                              _ratio(_one(g, m_tree="dynamic"), best), "approx"))
    return rows


def pruner_claims(runs: pd.DataFrame) -> list[dict]:
    """App. G.7: the pruner raises τ (by up to 4%)."""
    rows = []
    for (model, bc), g in _sweeps(ok_runs(runs, ["pruner"]), ["model", "bc"]):
        rows.append(claim_row("pruner raises τ, up to +4% (App. G.7)", "up to 1.04", "τ pruner on / off", model, bc,
                              _ratio(_one(g, m_pruner=True), _one(g, m_pruner=False)), "gt"))
    return rows


def table4_claims(runs: pd.DataFrame) -> list[dict]:
    """Table 4: the efficient implementation has the same τ as the naive one and is faster."""
    rows = []
    t4 = {k: v["llama3_8b"] for k, v in paper.TABLE4.items()}
    for (model, bc), g in _sweeps(ok_runs(runs, ["table4_impl"]), ["model", "bc"]):
        eff, naive = _one(g, m_impl="efficient"), _one(g, m_impl="naive")
        rows.append(claim_row("efficient = naive τ (Table 4)", "same τ", "τ efficient / naive", model, bc,
                              _ratio(eff, naive), "approx"))
        says = _paper_ratio(t4["efficient"], t4["naive"], "S/R, Llama-3.1-8B, bc 60") if bc == 60 else ""
        rows.append(claim_row("efficient faster than naive (Table 4)", says, "S/R efficient / naive", model, bc,
                              _ratio(eff, naive, "speedup"), "gt"))
    return rows


def copy_task_claims(runs: pd.DataFrame) -> list[dict]:
    """Figure 4 / §5: copy (n-gram) methods beat ESP on summarization and RAG, the tasks whose answers copy the
    prompt. PLD against ESP on each task's turns, and on both pooled (twice the turns), from the fig4 sweep (the
    findings run one on those two tasks), else from Table 1's."""
    rows = []
    df = ok_runs(runs, ["fig4"])
    if df.empty or not {"pld", "esp"} <= set(df.method):
        df = ok_runs(runs, ["table1"])
    for (model, bc), g in _sweeps(df, ["model", "bc"]):
        for task in ("summarization", "rag", ("summarization", "rag")):
            name = task if isinstance(task, str) else " + ".join(task)
            rows.append(claim_row("copy methods win on summarization / RAG (Figure 4)", "n-gram methods win",
                                  f"PLD / ESP τ on {name}", model, bc,
                                  _ratio(_one(g, method="pld"), _one(g, method="esp"), task=task), "gt"))
    return rows


def late_layer_gap(rows: list[dict], late_from: float = 2 / 3) -> dict | None:
    """Figure 2: mean cosine (mask vs true hidden state) over the late layers (the last third) of the slots
    whose mask top-1 was accepted, minus that of the rejected ones; its interval from the same bootstrap over
    turns as every other figure."""
    rows = [r for r in turn_order(rows) if r["cos"]]
    if not rows:
        return None
    n_layers = len(rows[0]["cos"][0]) - 1  # index 0 = the input embeddings
    first = max(1, math.ceil(late_from * n_layers))
    sums = np.zeros((len(rows), 4))  # per turn: Σ late cos of accepted slots, #accepted, same for rejected
    for i, r in enumerate(rows):
        cos = np.asarray(r["cos"])[:, first:].mean(1)
        acc = np.asarray(r["accepted"], bool)
        sums[i] = cos[acc].sum(), acc.sum(), cos[~acc].sum(), (~acc).sum()

    def gap(s):
        with np.errstate(divide="ignore", invalid="ignore"):
            return s[..., 0] / s[..., 1] - s[..., 2] / s[..., 3]

    point = float(gap(sums.sum(0)))
    ci = percentile_interval(gap(sums[resamples(len(rows))].sum(1))) if len(rows) >= 2 else None
    return {"ratio": point, "ci": ci, "n_turns": len(rows), "layers": (first, n_layers)}


def alignment_claims(alignment: list[dict]) -> list[dict]:
    """Figure 2: accepted masks align more with the true token than rejected ones in late layers."""
    out = []
    for s in alignment:
        path = Path(s["dir"]) / "alignment.jsonl"
        if not path.exists():
            continue
        cmp = late_layer_gap([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        if cmp is None:
            continue
        first, last = cmp["layers"]
        out.append(claim_row("accepted masks align more in late layers (Figure 2)", "≈0.45 − ≈0.35 = +0.10 "
                             "(Llama-3.2-3B)", f"cos accepted − rejected, layers {first}-{last}", s["model"], s["bc"],
                             cmp, "gt", threshold=0.0))
    return out


def findings(runs: pd.DataFrame, alignment: list[dict] = ()) -> pd.DataFrame:
    """The findings table: a row per claim and setting that the runs present can test."""
    rows = []
    if not runs.empty:
        for claims in (table1_claims, bc_claims, table3_claims, table5_claims, table2_claims, pruner_claims,
                       table4_claims, copy_task_claims):
            rows += claims(runs)
    rows += alignment_claims(list(alignment))
    rows = [r for r in rows if r]
    return pd.DataFrame(rows, columns=COLUMNS) if rows else pd.DataFrame()


def pairwise(runs: pd.DataFrame, group: str = "table1", figure: str = "tau") -> pd.DataFrame:
    """Every pair of methods of a sweep at each (model, bc): the higher one's figure over the lower one's, with
    its paired interval, whether the interval excludes 1 (over at least MIN_TURNS turns), and (if not) the turns
    it would take to."""
    rows = []
    for (model, bc), g in _sweeps(ok_runs(runs, [group]), ["model", "bc"]):
        ms = [m for m in methods_in(g) if m != "ar"]
        for i, a in enumerate(ms):
            for b in ms[i + 1:]:
                ra, rb = _one(g, method=a), _one(g, method=b)
                hi, lo = (ra, rb) if ra[figure] >= rb[figure] else (rb, ra)
                cmp = _ratio(hi, lo, figure)
                if cmp is None:
                    continue
                n_res = turns_to_resolve(cmp["ratio"], cmp["ci"], cmp["n_turns"], "gt")
                resolved = verdict(cmp["ratio"], cmp["ci"], "gt", n=cmp["n_turns"]) == "holds"
                rows.append({"model": model, "bc": bc, "comparison": f"{METHOD_LABEL.get(hi.method, hi.method)} / "
                             f"{METHOD_LABEL.get(lo.method, lo.method)} {figure}", "ratio": cmp["ratio"],
                             "95% interval": f"[{cmp['ci'][0]:.3f}, {cmp['ci'][1]:.3f}]" if cmp["ci"] else "",
                             "resolved": "yes" if resolved else "no", "turns": cmp["n_turns"],
                             "turns to resolve": _needed(n_res)})
    return pd.DataFrame(rows)


def invocations(extra: list[str], results: Path) -> list[tuple[str, list[str]]]:
    """(experiment, run.py arguments) of every sweep the claims need, in `EXPERIMENTS` order (Table 1, the
    longest, first)."""
    out = []
    for exp, parts in EXPERIMENTS.items():
        for part in parts:
            out.append((exp, [f"experiment={exp}", *SCALE, *extra, *part, f"hydra.sweep.dir={results.resolve() / exp}"]))
    return out


def run_all(extra: list[str], results: Path, jobs: int) -> list[tuple[str, int]]:
    """Run every invocation (`jobs` at a time, each single-threaded when more than one), logging each to
    results/logs/; returns (invocation, exit code)."""
    todo = invocations(extra, results)
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if jobs > 1 else {})
    start = time.time()

    def one(i_inv):
        i, (exp, args) = i_inv
        name = "_".join([exp] + [a.replace("=", "").replace(",", "_").lstrip("+") for a in args
                                 if a.startswith("bc=")])
        with open(logs / f"{name}.log", "w") as log:
            rc = subprocess.call([sys.executable, str(RUN_PY), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"[findings] {name}: {'done' if rc == 0 else f'FAILED (exit {rc}), see ' + str(logs / (name + '.log'))} "
              f"at {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        return name, rc

    print(f"[findings] {len(todo)} sweeps into {results} ({jobs} at a time); logs in {logs}", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, enumerate(todo)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="extra run.py overrides for every job, e.g. task.per_category=2")
    ap.add_argument("--results", type=Path, default=Path("results/findings"))
    ap.add_argument("--jobs", type=int, default=1, help="sweeps run at once (each single-threaded when > 1)")
    ap.add_argument("--report-only", action="store_true", help="only write the table from the runs already there")
    args = ap.parse_args(argv)
    failed = []
    if not args.report_only:
        failed = [name for name, rc in run_all(args.overrides, args.results, args.jobs) if rc]
    from experiments.report import write_report

    write_report(args.results, args.results / "report")
    table = args.results / "report" / "findings.md"
    if table.exists():
        print(table.read_text())
    else:
        print(f"no claim can be checked from the runs under {args.results}")
    if failed:
        raise SystemExit(f"{len(failed)} sweep(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
