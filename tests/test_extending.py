"""Adding a method is one class and one YAML: a toy method written into a temporary folder runs as a job,
in the benchmark's method list and in a multi-method experiment, without touching any file of the project."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.bench import bench_methods, main as bench_main
from experiments.report import write_report
from experiments.results import load_runs
from mtp.cli import check_command_line

ROOT = Path(__file__).resolve().parent.parent

TOY = '''
"""Toy: drafts the last token repeated, a chain of bc - 1 (right whenever the text repeats a token)."""
from mtp.loop import Block, Drafter, chain_block


class Toy(Drafter):
    name = "toy"
    min_bc = 2

    def __init__(self, bc: int, repeat: bool = True):
        self.bc, self.repeat = bc, repeat

    def propose(self, tokens: list[int]) -> Block:
        return chain_block([tokens[-1]] * (self.bc if self.repeat else 1))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A folder with the class (toy_method.py) and a config folder with its YAML (conf/method/toy.yaml)."""
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "toy.yaml").write_text("name: toy\n_target_: toy_method.Toy\nbc: ${bc}\nrepeat: true\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return conf, env


def run_py(*args, env):
    return subprocess.run([sys.executable, "run.py", *args, "wandb.mode=disabled"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_a_new_method_runs_as_a_job(toy, tmp_path):
    conf, env = toy
    assert "unknown method 'toy'" in check_command_line(["method=toy"])  # not a method of the project's own conf/
    assert check_command_line(["--config-dir", str(conf), "method=toy"]) is None
    out = tmp_path / "job"
    p = run_py("--config-dir", str(conf), "method=toy", "model=tiny_llama", "bc=10", "task.limit=2", "max_new_tokens=12",
               f"hydra.run.dir={out}", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "toy" and summary["lossless"] == "exact" and summary["max_tokens_per_forward"] == 10


def test_a_new_method_is_in_the_bench(toy, tmp_path, one_thread):
    conf, _ = toy
    assert "toy" in bench_methods([conf]) and "toy" not in bench_methods()
    out = tmp_path / "B.md"
    bench_main(["--config-dir", str(conf), "--model", "tiny_llama", "--methods", "ar", "toy", "--bcs", "10",
                "--max-new-tokens", "6", "--repeats", "1", "--per-task", "1", "--no-study", "--no-profile",
                "--no-load-times", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert [(r["method"], r["bc"]) for r in rows] == [("ar", None), ("toy", 10)] and rows[1]["lossless"] == "exact"


def test_a_new_method_is_in_a_multi_method_experiment(toy, tmp_path):
    conf, env = toy
    sweep = tmp_path / "sweep"
    p = run_py("--config-dir", str(conf), "experiment=table1", "model=tiny_llama", "bc=10", "task.limit=1", "task.turns=1",
               "max_new_tokens=4", f"hydra.sweep.dir={sweep}", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = load_runs(sweep)
    assert "toy" in set(runs.method) and {"esp", "pld"} <= set(runs.method) and set(runs.status) == {"ok"}
    assert "ar" not in set(runs.method)  # AR is the reference inside every job, not a row of its own
    write_report(sweep, tmp_path / "report")  # and into the experiment's table and figures
    assert "toy τ" in (tmp_path / "report" / "table1.md").read_text()
    assert "toy" in (tmp_path / "report" / "fig4_per_task_tau.md").read_text()
