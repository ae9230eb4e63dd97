"""The paper's tables, derived from job records: one function per table, each `runs -> DataFrame`.

Only successful jobs of the table's experiment group are used; failed jobs are listed in the footer,
never averaged. Columns marked "(paper)" hold the published numbers (experiments/paper.py), blank where
the paper has none. Speedups (S/R) are AR time / method time measured in the same job. A figure with a
bootstrap interval over turns (`mtp.stats`) prints as `value [lo, hi]` (95%).
"""

from __future__ import annotations

import json

import pandas as pd

from experiments import paper
from mtp.lossless import lossless_label

METHOD_ORDER = ["ar", "pld", "stand", "lade", "recycling", "suffix", "sam", "sam_tr", "logitspec", "esp", "esp_dynamic",
                "esp_plus"]
METHOD_LABEL = {"ar": "AR", "pld": "PLD", "stand": "STAND", "lade": "LADE", "recycling": "Recycling", "suffix": "Suffix",
                "sam": "SAM", "sam_tr": "SAM+TR", "logitspec": "LogitSpec", "esp": "ESP", "esp_dynamic": "ESP-dyn",
                "esp_plus": "ESP+"}
TASK_ORDER = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


def with_ci(value, ci):
    """`1.236 [1.195, 1.270]` when there is an interval, else the bare value."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else value


def _ci(run, key):
    ci = run.get("ci") if hasattr(run, "get") else None
    return ci.get(key) if isinstance(ci, dict) else None


def ok_runs(runs: pd.DataFrame, groups: list[str] | None = None) -> pd.DataFrame:
    if runs.empty:
        return runs
    df = runs[runs.status == "ok"]
    return df[df.group.isin(groups)] if groups is not None else df


def methods_in(df) -> list[str]:
    """The methods present, in the tables' order; a method the order does not name comes last, by name."""
    present = list(df.method.unique())
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


def self_repetition(records: list[dict], n: int = 4) -> float | None:
    """The share of the AR outputs' n-grams that repeat an earlier n-gram of the same output, pooled over turns:
    how much the model's greedy text copies itself, which is what copy drafters (PLD, SuffixDecoding, SAM)
    draft from. None when no record has AR's output."""
    repeated = total = 0
    for r in records:
        ids = r.get("ar_ids") or (r.get("ids") if r.get("method") == "ar" else None)
        if not ids:
            continue
        seen = set()
        for i in range(n, len(ids) + 1):
            gram = tuple(ids[i - n:i])
            repeated += gram in seen
            total += 1
            seen.add(gram)
    return repeated / total if total else None


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """τ and S/R per method, a row per (model, bc): ours, then the paper's published rows at the same bcs
    (every paper model, so a model the paper did not run still sits beside the paper's numbers). "AR
    4-gram repeats" is `self_repetition` of the AR outputs of the row's turns: a model whose greedy text loops
    hands copy drafters their acceptances."""
    from experiments.results import job_records

    df = ok_runs(runs, ["table1"])
    if df.empty:
        return pd.DataFrame()
    methods = methods_in(df)
    rows = []
    for (model, bc), g in df.groupby(["model", "bc"], sort=True):
        rep = self_repetition(job_records(g.iloc[0]))
        row = {"source": "ours", "model": model, "bc": bc, "AR 4-gram repeats": None if rep is None else round(rep, 3)}
        for m in methods:
            r = g[g.method == m]
            label = METHOD_LABEL.get(m, m)
            last = r.iloc[-1] if len(r) else None
            row |= {f"{label} τ": with_ci(last.tau, _ci(last, "tau")) if last is not None else None,
                    f"{label} S/R": with_ci(last.speedup, _ci(last, "speedup")) if last is not None else None}
        rows.append(row)
    for (model, bc), ref in sorted(paper.TABLE1.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if bc not in set(df.bc):
            continue
        row = {"source": "paper", "model": model, "bc": bc}
        for m in methods:
            label = METHOD_LABEL.get(m, m)
            tau, sr = ref.get(m, (None, None))
            row |= {f"{label} τ": tau, f"{label} S/R": sr}
        rows.append(row)
    return pd.DataFrame(rows)


def table1_references(runs: pd.DataFrame) -> pd.DataFrame:
    """The rivals' own published Spec-Bench figures (experiments/paper.py: their model and GPU) beside this
    harness's τ for the same method at each (model, bc) of the table1 sweep."""
    df = ok_runs(runs, ["table1"])
    if df.empty:
        return pd.DataFrame()
    rows = []
    for (method, source, model, hardware), (tau, speedup) in paper.RIVALS_SPEC_BENCH.items():
        row = {"method": METHOD_LABEL.get(method, method), "published τ": tau, "published speedup": speedup,
               "published on": f"{model}, {hardware} ({source})"}
        for (m, bc), g in df[df.method == method].groupby(["model", "bc"], sort=True):
            last = g.iloc[-1]
            row[f"τ {m} bc{bc}"] = with_ci(last.tau, _ci(last, "tau"))
        rows.append(row)
    return pd.DataFrame(rows)


def per_task_tau(runs: pd.DataFrame, groups=("fig4", "table1", "table6_calls", "bc120")) -> pd.DataFrame:
    """Figure 4/5 data: τ per task, with its interval (lo, hi), for every (model, method, bc); every job when
    `groups` is None."""
    df = ok_runs(runs, None if groups is None else list(groups))
    if not df.empty:
        df = df.assign(variant=_variant(df))
    rows = []
    for _, r in df.iterrows():
        # a method run under several sweep arms (ESP+'s ablation) is one entry per arm
        method = r.method if r.variant == "full" else f"{r.method} ({r.variant})"
        for task in TASK_ORDER:
            if task in (r.per_task_tau or {}):
                ci = (r.get("per_task_tau_ci") or {}).get(task) or [None, None]
                rows.append({"model": r.model, "method": method, "bc": r.bc, "task": task, "tau": r.per_task_tau[task],
                             "lo": ci[0], "hi": ci[1]})
    return pd.DataFrame(rows)


def per_task_table(long: pd.DataFrame) -> pd.DataFrame:
    """Per-task τ as a table: a row per (model, method, bc), a column per Spec-Bench task."""
    if long.empty:
        return long
    long = long.assign(cell=[with_ci(t, [lo, hi] if lo is not None and not pd.isna(lo) else None)
                             for t, lo, hi in zip(long.tau, long.lo, long.hi)])
    wide = long.pivot_table(index=["model", "method", "bc"], columns="task", values="cell", aggfunc="last")
    wide = wide[[t for t in TASK_ORDER if t in wide.columns]].reset_index()
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    wide = wide.sort_values(["model", "bc", "method"], key=lambda c: c.map(order) if c.name == "method" else c)
    wide["method"] = wide.method.map(lambda m: METHOD_LABEL.get(m, m))
    wide.columns.name = None
    return wide.reset_index(drop=True)


def _ablation(runs, group, by, paper_col=None) -> pd.DataFrame:
    df = ok_runs(runs, [group])
    if df.empty:
        return pd.DataFrame()
    cols = ["model", *by, "tau", "speedup", "tokens_per_s", "call_reduction", "max_tokens_per_forward", "lossless"]
    df = df.sort_values(["model", *by])
    out = df[[c for c in cols if c in df.columns]].reset_index(drop=True)
    if "lossless" in out:
        out["lossless"] = [lossless_label(r) for _, r in df.iterrows()]
    for key in ("tau", "speedup", "tokens_per_s", "call_reduction"):
        if key in out:
            out[key] = [with_ci(v, _ci(r, key)) for v, (_, r) in zip(out[key], df.iterrows())]
    if paper_col is not None:
        out["tau (paper)"] = [paper_col(r) for _, r in out.iterrows()]
    return out


def table2_dynamic(runs):
    out = _ablation(runs, "table2_dynamic", ["bc", "m_tree", "m_widths"])
    if not out.empty:
        out["tau (paper)"] = [paper.TABLE2_BC60["dynamic"] if (r.bc == 60 and r.m_tree == "dynamic") else None
                              for _, r in out.iterrows()]
    return out


def table3_masks(runs):
    return _ablation(runs, "table3_masks", ["m_widths"],
                     lambda r: paper.TABLE3.get(len(json.loads(r.m_widths)) if isinstance(r.m_widths, str) else None, {}).get(r.model))


def table4_impl(runs):
    out = _ablation(runs, "table4_impl", ["bc", "m_impl"])
    if not out.empty:
        out["S/R (paper)"] = [paper.TABLE4.get(r.m_impl, {}).get(r.model) if r.bc == 60 else None for _, r in out.iterrows()]
    return out


def table5_init(runs):
    return _ablation(runs, "table5_init", ["m_init"], lambda r: paper.TABLE5.get(r.m_init, {}).get(r.model))


def table6_calls(runs):
    df = ok_runs(runs, ["table6_calls", "table1", "fig4"])
    if df.empty:
        return pd.DataFrame()
    return (df.pivot_table(index=["model", "bc"], columns="method", values="call_reduction", aggfunc="last")
            .reindex(columns=[m for m in METHOD_ORDER if m in set(df.method)]).reset_index())


def _variant(df) -> pd.Series:
    """A row's label within its method: from the sweep arm it ran as, less the method's name (esp_plus ->
    full, esp_plus_no_esp -> no_esp); full when it ran under no arm or an arm of another name."""
    arms = df["arm"] if "arm" in df else pd.Series(None, index=df.index)

    def label(arm, method):
        return (arm.removeprefix(method).lstrip("_") or "full") if isinstance(arm, str) and arm.startswith(method) else "full"

    return pd.Series([label(a, m) for a, m in zip(arms, df.method)], index=df.index)


def esp_plus_tasks(runs: pd.DataFrame, group: str = "esp_plus_ablation") -> pd.DataFrame:
    """Every method of a sweep (esp_plus_ablation, or table1), with ESP+ complete (`full`, and sized by cost):
    τ per task and overall, speedup and loop overhead; for ESP+, its τ over the best other method's at the
    same bc with the paired bootstrap interval of that ratio (the same resampled turns for both), whether the
    interval's lower end clears 1.10 (the claim "ESP+ ≥ 1.10× the best other" holds only then), and the
    tasks where its point τ is at least 1.10x the best other's."""
    from experiments.results import job_records
    from mtp.stats import paired_ratio

    df = ok_runs(runs, [group])
    if df.empty:
        return pd.DataFrame()
    df = df.assign(variant=_variant(df))
    df = df[df.variant.isin(["full", "cost"])]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows = []
    for (model, bc), g in df.groupby(["model", "bc"], sort=True):
        others = g[g.method != "esp_plus"]
        best = {t: max([(o.per_task_tau or {}).get(t) or 0 for _, o in others.iterrows()] or [0]) for t in TASK_ORDER}
        for _, r in g.sort_values(["method", "variant"], key=lambda c: c.map(order) if c.name == "method" else c).iterrows():
            label = METHOD_LABEL.get(r.method, r.method) + (" (cost)" if r.variant == "cost" else "")
            row = {"model": model, "bc": bc, "method": label} | {t: (r.per_task_tau or {}).get(t) for t in TASK_ORDER}
            row |= {"τ": r.tau, "speedup": r.speedup, "loop overhead": r.get("loop_overhead"),
                    "tokens / forward": r.mean_tokens_per_forward, "lossless": lossless_label(r)}
            if r.method == "esp_plus" and len(others):
                best_run = others.loc[others.tau.idxmax()]
                cmp = paired_ratio(job_records(r), job_records(best_run), "tau")
                row["τ / best other"] = with_ci(cmp["ratio"], cmp["ci"])
                row["best other"] = METHOD_LABEL.get(best_run.method, best_run.method)
                row["≥ 1.10× best (interval)"] = ("yes" if cmp["ci"] and cmp["ci"][0] >= 1.10 else
                                                  "no" if cmp["ci"] and cmp["ci"][1] < 1.10 else "unresolved")
                present = [t for t in TASK_ORDER if best[t] > 0]
                wins = sum(((r.per_task_tau or {}).get(t) or 0) >= 1.10 * best[t] for t in present)
                row["tasks ≥ 1.10× best"] = f"{wins}/{len(present)}"
            rows.append(row)
    return pd.DataFrame(rows)


def esp_plus_ablation(runs: pd.DataFrame) -> pd.DataFrame:
    """ESP+ with each ingredient switched off (conf/arm/esp_plus_*): τ per task and overall, and the change
    against ESP+ with every ingredient on at the same bc."""
    df = ok_runs(runs, ["esp_plus_ablation"])
    df = df[df.method == "esp_plus"] if not df.empty else df
    if df.empty:
        return pd.DataFrame()
    df = df.assign(variant=_variant(df))
    rows = []
    for (model, bc), g in df.groupby(["model", "bc"], sort=True):
        full = g[g.variant == "full"].tau
        for _, r in g.sort_values("variant", key=lambda v: v.map(lambda x: (x != "full", x))).iterrows():
            rows.append({"model": model, "bc": bc, "variant": r.variant} | {t: (r.per_task_tau or {}).get(t) for t in TASK_ORDER}
                        | {"τ": r.tau, "Δτ vs full": r.tau - full.iloc[-1] if len(full) else None})
    return pd.DataFrame(rows)


def jobs(runs: pd.DataFrame) -> pd.DataFrame:
    """Every successful job under the results folder, of any experiment or none (a single default job
    included): its τ, speedup and decode-only speedup with intervals, the bound its model calls set,
    tokens per forward and losslessness."""
    df = ok_runs(runs)
    if df.empty:
        return pd.DataFrame()
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    df = df.sort_values(["model", "bc", "method"], key=lambda c: c.map(order) if c.name == "method" else c)
    rows = []
    for _, r in df.iterrows():
        rows.append({"model": r.model, "method": METHOD_LABEL.get(r.method, r.method), "bc": r.bc,
                     "group": r.get("group"), "task": r.task, "split": r.get("split"), "turns": r.n_turns,
                     "τ": with_ci(r.tau, _ci(r, "tau")), "speedup": with_ci(r.speedup, _ci(r, "speedup")),
                     "decode-only speedup": with_ci(r.get("decode_speedup"), _ci(r, "decode_speedup")),
                     "bound": r.get("bound"), "tokens / forward": r.mean_tokens_per_forward, "lossless": lossless_label(r),
                     "draft tree": r.get("draft_tree")})
    return pd.DataFrame(rows)


TABLES = {
    "jobs": jobs,
    "per_task_tau": lambda runs: per_task_table(per_task_tau(runs, None)),
    "table1": table1,
    "table1_references": table1_references,
    "fig4_per_task_tau": lambda runs: per_task_table(per_task_tau(runs)),
    "table2_dynamic": table2_dynamic,
    "table3_masks": table3_masks,
    "table4_impl": table4_impl,
    "table5_init": table5_init,
    "table6_calls": table6_calls,
    "temperature": lambda runs: _ablation(runs, "temperature", ["bc"]),
    "bc120": lambda runs: _ablation(runs, "bc120", ["method"]),
    "pruner": lambda runs: _ablation(runs, "pruner", ["bc", "m_pruner"]),
    "ood_init": lambda runs: _ablation(runs, "ood_init", ["m_init", "m_ood_sigmas"]),
    "lambda": lambda runs: _ablation(runs, "lambda", ["m_lam"]),
    "esp_plus_tasks": esp_plus_tasks,
    "table1_esp_plus": lambda runs: esp_plus_tasks(runs, "table1"),
    "esp_plus_ablation": esp_plus_ablation,
}


def conditions(runs: pd.DataFrame) -> str:
    """One line of the conditions behind a table's numbers, and the jobs that failed."""
    ok = ok_runs(runs)
    if ok.empty:
        return "no successful runs"

    def vals(col):
        return ", ".join(sorted({str(v) for v in ok[col].dropna()}))

    line = (f"models: {vals('model')}; dtype: {vals('dtype')}; device: {vals('device_name')}; task: {vals('task')}; "
            f"prompts per job: {vals('n_prompts')}; max new tokens: {vals('max_new_tokens')}; "
            f"temperature: {vals('temperature')}; torch {vals('torch')}, transformers {vals('transformers')}; "
            "git " + ", ".join(sorted({str(g)[:7] for g in ok.git.dropna()})))
    if "split" in ok:
        line += "; split: " + vals("split")
    if "draft_tree" in ok and (ok.draft_tree == "rule").any():
        rule = ok[ok.draft_tree == "rule"]
        line += ("; rule tree (unfitted: no fitted tree for the model, python -m experiments.fit_trees fits one; or "
                 "method.tree=rule): "
                 + ", ".join(sorted({f"{r.model}/{r.method}/bc{r.bc}" for r in rule.itertuples()})))
    failed = runs[runs.status == "failed"]
    if len(failed):
        line += "; FAILED (not in the numbers): " + "; ".join(f"{d} ({e})" for d, e in zip(failed.dir, failed.error))
    return line


def to_markdown(df: pd.DataFrame, footer: str = "") -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + (f"\n\n{footer}\n" if footer else "\n")


def to_latex(df: pd.DataFrame, footer: str = "") -> str:
    tex = df.to_latex(index=False, float_format="%.3f", na_rep="")
    return tex + (f"% {footer}\n" if footer else "")
