"""The paper's tables, derived from job records: one function per table, each `runs -> DataFrame`.

Only successful jobs of the table's experiment group are used; failed jobs are listed in the footer,
never averaged. Columns marked "(paper)" hold the published numbers (experiments/paper.py), blank where
the paper has none. Speedups (S/R) are AR time / method time measured in the same job.
"""

from __future__ import annotations

import json

import pandas as pd

from experiments import paper

METHOD_ORDER = ["ar", "pld", "stand", "lade", "recycling", "esp", "esp_dynamic", "esp_plus"]
METHOD_LABEL = {"ar": "AR", "pld": "PLD", "stand": "STAND", "lade": "LADE", "recycling": "Recycling", "esp": "ESP",
                "esp_dynamic": "ESP-dyn", "esp_plus": "ESP+"}
TASK_ORDER = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


def ok_runs(runs: pd.DataFrame, groups: list[str] | None = None) -> pd.DataFrame:
    if runs.empty:
        return runs
    df = runs[runs.status == "ok"]
    return df[df.group.isin(groups)] if groups is not None else df


def methods_in(df) -> list[str]:
    """The methods present, in the tables' order; a method the order does not name comes last, by name."""
    present = list(df.method.unique())
    return [m for m in METHOD_ORDER if m in present] + sorted(m for m in present if m not in METHOD_ORDER)


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """τ and S/R per method, a row per (model, bc): ours, then the paper's published rows at the same bcs
    (every paper model, so a model the paper did not run still sits beside the paper's numbers)."""
    df = ok_runs(runs, ["table1"])
    if df.empty:
        return pd.DataFrame()
    methods = methods_in(df)
    rows = []
    for (model, bc), g in df.groupby(["model", "bc"], sort=True):
        row = {"source": "ours", "model": model, "bc": bc}
        for m in methods:
            r = g[g.method == m]
            label = METHOD_LABEL.get(m, m)
            row |= {f"{label} τ": r.tau.iloc[-1] if len(r) else None, f"{label} S/R": r.speedup.iloc[-1] if len(r) else None}
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


def per_task_tau(runs: pd.DataFrame, groups=("fig4", "table1", "table6_calls", "bc120")) -> pd.DataFrame:
    """Figure 4/5 data: τ per task for every (model, method, bc)."""
    df = ok_runs(runs, list(groups))
    rows = []
    for _, r in df.iterrows():
        for task in TASK_ORDER:
            if task in (r.per_task_tau or {}):
                rows.append({"model": r.model, "method": r.method, "bc": r.bc, "task": task, "tau": r.per_task_tau[task]})
    return pd.DataFrame(rows)


def per_task_table(long: pd.DataFrame) -> pd.DataFrame:
    """Per-task τ as a table: a row per (model, method, bc), a column per Spec-Bench task."""
    if long.empty:
        return long
    wide = long.pivot_table(index=["model", "method", "bc"], columns="task", values="tau", aggfunc="last")
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
    out = df[[c for c in cols if c in df.columns]].sort_values(["model", *by]).reset_index(drop=True)
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


def esp_plus_tasks(runs: pd.DataFrame) -> pd.DataFrame:
    """Every method of the esp_plus_ablation sweep, with ESP+ complete (`full`, and sized by cost): τ per
    task and overall, speedup and loop overhead; for ESP+, its τ over the best other method's at the same
    bc and the tasks where it is at least 1.10x the best other."""
    df = ok_runs(runs, ["esp_plus_ablation"])
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
                    "tokens / forward": r.mean_tokens_per_forward, "lossless": r.lossless}
            if r.method == "esp_plus" and len(others):
                row["τ / best other"] = r.tau / others.tau.max()
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


TABLES = {
    "table1": table1,
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
        line += ("; rule tree (unfitted), no fitted tree for the model (python -m experiments.fit_trees): "
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
