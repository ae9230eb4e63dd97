"""The paper's figures from job records (matplotlib, PNG + PDF). Each `plot_*` writes its files and
returns their paths."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.tables import METHOD_LABEL, TASK_ORDER, methods_in, ok_runs, per_task_tau  # noqa: E402

COMPARISON_GROUPS = ["fig4", "table1", "table6_calls", "bc120"]
TASK_LABEL = {"mt_bench": "MT-bench", "translation": "translation", "summarization": "summary", "qa": "QA",
              "math_reasoning": "math", "rag": "RAG"}


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _offset(i: int, n: int, width: float) -> float:
    """x shift of the i-th of n side-by-side bars of `width`, centred on the tick."""
    return (i - (n - 1) / 2) * width


def _yerr(d) -> np.ndarray | None:
    """Asymmetric error bars (2, n) from interval columns lo/hi around `tau`; None without intervals."""
    if "lo" not in d or d.lo.isna().all():
        return None
    return np.vstack([(d.tau - d.lo).clip(lower=0).fillna(0), (d.hi - d.tau).clip(lower=0).fillna(0)])


def comparison_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The jobs of the method-comparison sweeps, one per (model, method, bc): where two sweeps ran the same
    method at the same bc (the findings' narrow fig4 sweep beside Table 1), the widest sweep's (most jobs of
    that model), so a figure's points come from one set of prompts as far as the sweeps allow."""
    df = ok_runs(runs, COMPARISON_GROUPS)
    if df.empty:
        return df
    size = df.groupby(["model", "group"]).size().rename("sweep_jobs").reset_index()
    df = df.merge(size, on=["model", "group"]).sort_values(["sweep_jobs", "mtime"], ascending=[False, False])
    return df.drop_duplicates(["model", "method", "bc"]).drop(columns="sweep_jobs")


def plot_per_task_tau(runs: pd.DataFrame, out: Path, groups=COMPARISON_GROUPS, name="fig4_per_task_tau") -> list[Path]:
    """Figure 4/5: τ per Spec-Bench task with its 95% interval, one bar per method, one panel per bc (per
    model); over every job when `groups` is None."""
    data = per_task_tau(runs, groups)
    paths = []
    for model, dm in data.groupby("model") if not data.empty else []:
        bcs = sorted(dm.bc.unique())
        methods = methods_in(dm)
        fig, axes = plt.subplots(1, len(bcs), figsize=(6.5 * len(bcs), 4.2), sharey=True, squeeze=False)
        x = np.arange(len(TASK_ORDER))
        width = 0.8 / max(1, len(methods))
        for ax, bc in zip(axes[0], bcs):
            for i, m in enumerate(methods):
                d = dm[(dm.bc == bc) & (dm.method == m)].groupby("task").last().reindex(TASK_ORDER)  # newest per task
                ax.bar(x + _offset(i, len(methods), width), d.tau, width, yerr=_yerr(d), capsize=2,
                       error_kw={"lw": 0.8}, label=METHOD_LABEL.get(m, m))
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xticks(x, [TASK_LABEL[t] for t in TASK_ORDER], fontsize=9, rotation=20)
            ax.set_title(f"bc = {bc}")
            ax.set_xlabel("Spec-Bench task")
        axes[0][0].set_ylabel("τ (tokens per forward step)")
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
        fig.suptitle(f"Acceptance length per task — {model}")
        paths += _save(fig, out, f"{name}_{model}")
    return paths


def plot_vs_bc(runs: pd.DataFrame, out: Path) -> list[Path]:
    """τ and speedup against bc, one line per method (per model)."""
    df = comparison_runs(runs)
    paths = []
    for model, dm in df.groupby("model") if not df.empty else []:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for m in methods_in(dm):
            d = dm[dm.method == m].sort_values("bc")
            a1.plot(d.bc, d.tau, "o-", label=METHOD_LABEL.get(m, m))
            a2.plot(d.bc, d.speedup, "o-", label=METHOD_LABEL.get(m, m))
        a1.set(xlabel="block complexity (tokens per forward)", ylabel="τ", title="acceptance length")
        a2.set(xlabel="block complexity (tokens per forward)", ylabel="speedup vs AR (same job)", title="speedup")
        a2.axhline(1.0, color="grey", lw=0.8, ls="--")
        a1.legend(fontsize=8)
        fig.suptitle(model)
        paths += _save(fig, out, f"tau_speedup_vs_bc_{model}")
    return paths


def plot_accept_hist(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Share of decode steps committing 1, 2, 3, … tokens, per method (per model and bc)."""
    df = comparison_runs(runs)
    paths = []
    for (model, bc), d in df.groupby(["model", "bc"]) if not df.empty else []:
        fig, ax = plt.subplots(figsize=(6, 4))
        methods = methods_in(d)
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            hist = {int(k): v for k, v in d[d.method == m].iloc[-1].accept_hist.items()}
            n = np.arange(1, max(hist) + 1)
            share = np.array([hist.get(int(k), 0) for k in n]) / sum(hist.values())
            ax.bar(n + _offset(i, len(methods), width), share, width, label=METHOD_LABEL.get(m, m))
        ax.set(xlabel="tokens committed in one step", ylabel="share of decode steps", title=f"{model}, bc = {bc}")
        ax.legend(fontsize=8)
        paths += _save(fig, out, f"accept_hist_{model}_bc{bc}")
    return paths


def plot_call_reduction(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Table 6 as bars: 1 − decode calls / AR decode calls, per method and bc (per model)."""
    df = comparison_runs(runs)
    paths = []
    for model, dm in df.groupby("model") if not df.empty else []:
        bcs = sorted(dm.bc.unique())
        methods = methods_in(dm)
        fig, ax = plt.subplots(figsize=(6, 4))
        x = np.arange(len(bcs))
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            d = dm[dm.method == m].set_index("bc").reindex(bcs)
            ax.bar(x + _offset(i, len(methods), width), 100 * d.call_reduction.astype(float), width,
                   label=METHOD_LABEL.get(m, m))
        ax.set_xticks(x, [str(b) for b in bcs])
        ax.set(xlabel="block complexity", ylabel="fewer forward calls than AR (%)", title=model)
        ax.legend(fontsize=8)
        paths += _save(fig, out, f"call_reduction_{model}")
    return paths


def plot_alignment(summaries: list[dict], out: Path) -> list[Path]:
    """Figure 2 / Lemma 3.1 (one per alignment job): per-layer cosine of the mask's and the true token's
    hidden states, accepted vs rejected; and P(true token in the mask's Top-K) per last-layer cosine bin."""
    paths = []
    for s in summaries:
        if not s.get("n_slots"):
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for key, label, color in (("accepted", "mask top-1 = true token", "tab:green"),
                                  ("rejected", "mask top-1 ≠ true token", "tab:red")):
            mean, se = s.get(f"cos_{key}"), s.get(f"cos_{key}_se")
            if mean is None:
                continue
            layers = np.arange(len(mean))
            n = s[f"n_{key}"]
            a1.plot(layers, mean, "o-", ms=3, color=color, label=f"{label} (n = {n})")
            a1.fill_between(layers, np.subtract(mean, se), np.add(mean, se), color=color, alpha=0.2)
        a1.set(xlabel="layer (0 = input embeddings)", ylabel="cosine similarity (mean ± s.e.)",
               title="mask vs true token, same slot")
        a1.legend(fontsize=8)
        bins = [b for b in s["last_layer_bins"] if b["n"]]
        mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
        a2.bar(mids, [b["p_in_top_k"] for b in bins], width=0.9 * (bins[0]["hi"] - bins[0]["lo"]), color="tab:blue")
        for x, b in zip(mids, bins):
            a2.annotate(f"n={b['n']}", (x, b["p_in_top_k"]), ha="center", va="bottom", fontsize=7)
        if s.get("delta_star") is not None:
            a2.axvline(s["delta_star"], color="k", ls="--", lw=0.8, label=f"δ* = {s['delta_star']:.3f}")
            a2.legend(fontsize=8, loc="upper left")
        a2.set(xlabel="last-layer cosine similarity", ylabel=f"P(true token in mask's Top-{s['top_k']})",
               ylim=(0, 1.1), title="Lemma 3.1: similarity vs Top-K hit")
        cats = ((s.get("config") or {}).get("task") or {}).get("categories")
        task = f"{s['task']} [{', '.join(cats)}]" if cats else s["task"]
        fig.suptitle(f"ESP mask alignment — {s['model']}, {task} ({s['n_turns']} turns, {s['n_slots']} slots)")
        paths += _save(fig, out, f"fig2_alignment_{s['model']}")
    return paths


def plot_acceptance_by_depth(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Per-position acceptance (vLLM-style): P(depth d accepted | depth d - 1 accepted and a draft below it),
    one line per method, one panel per bc (per model), over every job."""
    df = ok_runs(runs)
    paths = []
    for model, dm in df.groupby("model") if not df.empty else []:
        bcs = sorted(dm.bc.unique())
        fig, axes = plt.subplots(1, len(bcs), figsize=(5 * len(bcs), 3.8), sharey=True, squeeze=False)
        for ax, bc in zip(axes[0], bcs):
            for m in methods_in(dm[dm.bc == bc]):
                rates = dm[(dm.bc == bc) & (dm.method == m)].iloc[-1].get("acceptance_by_depth") or []
                if len(rates):
                    ax.plot(np.arange(1, len(rates) + 1), rates, "o-", ms=3, label=METHOD_LABEL.get(m, m))
            ax.set(xlabel="draft position d", title=f"bc = {bc}", ylim=(0, 1.02))
        axes[0][0].set_ylabel("P(d accepted | d − 1 accepted)")
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
        fig.suptitle(f"Acceptance per draft position — {model}")
        paths += _save(fig, out, f"acceptance_by_depth_{model}")
    return paths


FIGURES = [plot_per_task_tau, plot_vs_bc, plot_accept_hist, plot_call_reduction, plot_acceptance_by_depth,
           lambda runs, out: plot_per_task_tau(runs, out, groups=None, name="per_task_tau_all_jobs")]
