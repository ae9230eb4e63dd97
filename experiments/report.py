"""Write every table (Markdown + LaTeX) and figure (PNG + PDF) that the results support.

    python -m experiments.report                      # reads results/, writes results/report/
    python -m experiments.report --results results/table1 --out /tmp/report
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.alignment import load_alignment
from experiments.figures import FIGURES, plot_alignment
from experiments.findings import findings, pairwise
from experiments.results import load_runs
from experiments.tables import TABLES, conditions, to_latex, to_markdown
from mtp.runner import write_atomic

ANY_JOBS = ("jobs", "per_task_tau")  # tables of every job present; the others need an experiment sweep


def write_report(results: Path, out: Path) -> list[Path]:
    runs, alignment = load_runs(results), load_alignment(results)
    if runs.empty and not alignment:
        raise SystemExit(f"no job outputs (summary.json / alignment.json / error.json) under {results}")
    out.mkdir(parents=True, exist_ok=True)
    written = plot_alignment(alignment, out / "figures")
    claims = findings(runs, alignment)
    if not claims.empty:
        note = ("Verdicts at 95% (experiments/findings.py): holds / contradicted when the paired bootstrap interval "
                "clears / misses the claim's threshold, else unresolved. Conditions: "
                + (conditions(runs) if not runs.empty else "alignment runs only"))
        write_atomic(out / "findings.md", "## findings\n\n" + to_markdown(claims, note))
        written.append(out / "findings.md")
    if runs.empty:
        return written
    # the tables are built from experiment sweeps: state their conditions, not those of stray single jobs
    swept = runs[runs.group.notna()] if "group" in runs and runs.group.notna().any() else runs
    footer = "Conditions: " + conditions(swept)
    for name, fn in (TABLES | {"table1_pairs": pairwise}).items():
        df = fn(runs)
        if df.empty:
            continue
        note = "Conditions: " + conditions(runs) if name in ANY_JOBS else footer
        write_atomic(out / f"{name}.md", f"## {name}\n\n" + to_markdown(df, note))
        write_atomic(out / f"{name}.tex", to_latex(df, note))
        written += [out / f"{name}.md", out / f"{name}.tex"]
    for plot in FIGURES:
        written += plot(runs, out / "figures")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results"), help="folder searched for job outputs")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/report)")
    args = ap.parse_args()
    out = args.out or args.results / "report"
    written = write_report(args.results, out)
    for p in written:
        print(p)
    if not any(p.stem not in ANY_JOBS and p.suffix == ".md" for p in written):
        print(f"(no experiment sweep under {args.results}: the paper's tables need one, e.g. "
              f"python run.py experiment=table1 model=smollm2_135m task.per_category=1 max_new_tokens=32)")


if __name__ == "__main__":
    main()
