"""Paper experiments: every experiment composes and can be narrowed; a real multirun on a tiny model
yields the tables and figures through experiments/."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.report import write_report
from experiments.results import load_runs
from mtp.cli import CONF

from .conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_narrows(name):
    cfg = compose_cfg([f"experiment={name}", "model=smollm2_135m", "task.per_category=1"])
    assert cfg.model.name == "smollm2_135m" and cfg.task.per_category == 1
    assert cfg.wandb.group == name


def test_multirun_to_tables_and_figures(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "run.py", "experiment=fig4", "model=tiny_llama", "method=pld,esp", "bc=10,30",
                        "task.limit=2", "max_new_tokens=6", "wandb.mode=disabled", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = load_runs(sweep)
    assert len(runs) == 4 and set(runs.status) == {"ok"} and set(runs.group) == {"fig4"}
    written = {p.name for p in write_report(sweep, tmp_path / "report")}
    assert {"table6_calls.md", "table6_calls.tex", "fig4_per_task_tau.md"} <= written
    assert {"fig4_per_task_tau_tiny_llama.png", "fig4_per_task_tau_tiny_llama.pdf",
            "tau_speedup_vs_bc_tiny_llama.png", "call_reduction_tiny_llama.png", "accept_hist_tiny_llama_bc30.png"} <= written
    md = (tmp_path / "report" / "table6_calls.md").read_text()
    assert "| tiny_llama | 10 |" in md and "Conditions: models: tiny_llama" in md

    # the notebook shows the same tables and figures, executed headless
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "results.ipynb", as_version=4)
    monkeypatch.setenv("MTP_RESULTS", str(sweep))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    assert any("table6_calls" in str(o.get("data", {})) for o in outputs)


def test_fig2_alignment_job_to_figure(tmp_path):
    """experiment=fig2 runs the alignment job (not a decode job), logs it to W&B offline, and the report
    draws Figure 2 from its alignment.json."""
    import json

    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "run.py", "experiment=fig2", "model=tiny_llama", "task.limit=2",
                        "max_new_tokens=8", "wandb.mode=offline", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    (summary_file,) = sweep.rglob("alignment.json")
    s = json.loads(summary_file.read_text())
    assert s["job"] == "alignment" and s["n_turns"] == 4 and s["n_slots"] > 0  # 2 questions x 2 turns
    assert len(s["cos_accepted"] or s["cos_rejected"]) == 3  # tiny_llama: 2 layers + embeddings
    assert len((summary_file.parent / "alignment.jsonl").read_text().splitlines()) == 4
    assert list(summary_file.parent.glob("wandb/offline-run-*/run-*.wandb"))
    assert "delta* (last layer)" in p.stdout
    written = {p.name for p in write_report(sweep, tmp_path / "report")}
    assert {"fig2_alignment_tiny_llama.png", "fig2_alignment_tiny_llama.pdf"} <= written


def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # bc=5 is below ESP's k=2 minimum (9): that job fails, the bc=30 job still runs
    p = subprocess.run([sys.executable, "run.py", "-m", "model=tiny_llama", "method.k=2", "bc=5,30", "task.limit=1",
                        "max_new_tokens=4", "wandb.mode=disabled", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = load_runs(sweep)
    assert sorted(runs.status) == ["failed", "ok"]
    assert "too small" in runs[runs.status == "failed"].error.iloc[0]


def test_local_launcher_runs_jobs_in_parallel_processes(tmp_path):
    """hydra/launcher=local (submitit's local executor), for real on the tiny model."""
    p = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=local", "model=tiny_llama", "bc=10,30",
                        "task.limit=1", "max_new_tokens=4", "wandb.mode=disabled", f"hydra.sweep.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = load_runs(tmp_path)
    assert sorted(runs.bc) == [10, 30] and set(runs.status) == {"ok"} and set(runs.lossless) == {"exact"}
    assert (tmp_path / ".submitit").is_dir()


def test_esp_plus_ablation_sweep_over_arms_to_its_tables(tmp_path):
    """The arms sweep: rivals and ESP+ carry the AR comparison, ablation arms record τ only; the two ESP+
    tables come from the one sweep."""
    sweep = tmp_path / "sweep"
    p = subprocess.run([sys.executable, "run.py", "experiment=esp_plus_ablation", "model=tiny_llama", "bc=30",
                        "arm=recycling,esp_plus,esp_plus_no_ngram", "task.limit=3", "max_new_tokens=6",
                        "wandb.mode=disabled", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = load_runs(sweep).set_index("arm", drop=False)
    assert len(runs) == 3 and set(runs.status) == {"ok"}
    assert pd.isna(runs.loc["esp_plus_no_ngram"].speedup) and runs.loc["esp_plus_no_ngram"].tau > 0  # τ only
    assert runs.loc["esp_plus"].lossless == "exact" and runs.loc["esp_plus"].loop_overhead > 0
    write_report(sweep, tmp_path / "report")
    tasks = (tmp_path / "report" / "esp_plus_tasks.md").read_text()
    assert "| tiny_llama | 30 | Recycling |" in tasks and "| tiny_llama | 30 | ESP+ |" in tasks and "/1 |" in tasks
    ablation = (tmp_path / "report" / "esp_plus_ablation.md").read_text()
    assert "| tiny_llama | 30 | full |" in ablation and "| tiny_llama | 30 | no_ngram |" in ablation


def test_two_runs_that_differ_in_one_option_are_two_rows(tmp_path):
    """Runs are identified by their fingerprint: two ESP+ jobs that differ only in method.momentum (an option
    no hand-written identity list named) are both in the results and the tables."""
    from experiments.tables import jobs
    from run import run_any

    from .conftest import compose_cfg

    base = ["model=tiny_llama", "method=esp_plus", "task.limit=2", "max_new_tokens=6", "bc=10", "wandb.mode=disabled"]
    run_any(compose_cfg(base), tmp_path / "a")
    run_any(compose_cfg(base + ["method.momentum=0.5"]), tmp_path / "b")
    runs = load_runs(tmp_path)
    assert len(runs) == 2 and sorted(runs.m_momentum) == [0.0, 0.5] and runs.fingerprint.nunique() == 2
    assert len(jobs(runs)) == 2
    run_any(compose_cfg(base + ["method.momentum=0.5"]), tmp_path / "c")  # the same job again: the newest wins
    runs = load_runs(tmp_path)
    assert len(runs) == 2 and (tmp_path / "c").as_posix() in set(runs.dir)


def test_self_repetition_counts_the_ar_outputs_repeated_ngrams():
    from experiments.tables import self_repetition

    # 4-grams of 1 2 3 4 1 2 3 4 5: 1234 2341 3412 4123 1234 2345 -> one of six repeats an earlier one
    assert self_repetition([{"method": "esp", "ids": [9] * 9, "ar_ids": [1, 2, 3, 4, 1, 2, 3, 4, 5]}]) == 1 / 6
    # pooled over turns, each turn's n-grams seen only within it; an AR job's own ids are AR's output
    assert self_repetition([{"method": "ar", "ids": [7] * 6}, {"method": "ar", "ids": [1, 2, 3, 4]}]) == 2 / 4
    assert self_repetition([{"method": "esp", "ids": [1, 2, 3, 4, 1, 2, 3, 4]}]) is None  # no AR output recorded
