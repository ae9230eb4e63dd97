"""Paper experiments: every experiment composes and can be narrowed; a real multirun on a tiny model
yields the tables and figures through experiments/."""

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.report import write_report
from experiments.results import load_runs

from .conftest import CONF, compose_cfg

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_narrows(name):
    cfg = compose_cfg([f"experiment={name}", "model=smollm2_135m", "task.per_category=1"])
    assert cfg.model.name == "smollm2_135m" and cfg.task.per_category == 1
    assert cfg.wandb.group == name


def test_multirun_to_tables_and_figures(tmp_path):
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
