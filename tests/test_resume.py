"""A job killed mid-run (a real SIGKILL) resumes with the same command, skips the finished turns, and
ends with the same records and counters as an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["model=tiny_llama", "method=esp", "task=mt_bench", "task.limit=4", "max_new_tokens=48", "wandb.mode=disabled"]
COUNTERS = ["tau", "decode_calls", "ar_decode_calls", "new_tokens", "max_tokens_per_forward", "accept_hist",
            "lossless", "n_turns", "per_task_tau"]


def cmd(out, *extra):
    return [sys.executable, "run.py", *ARGS, *extra, f"hydra.run.dir={out}"]


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_killed_job_resumes_to_the_same_result(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(cmd(whole), cwd=ROOT, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(cmd(cut), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        f = cut / "records.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(records(cut))
    assert 3 <= n_before < 8 and not (cut / "summary.json").exists()

    p = subprocess.run(cmd(cut), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = json.loads((whole / "summary.json").read_text()), json.loads((cut / "summary.json").read_text())
    assert b["resumed_turns"] == n_before and a["resumed_turns"] == 0
    assert {k: a[k] for k in COUNTERS} == {k: b[k] for k in COUNTERS}
    assert [r["ids"] for r in records(whole)] == [r["ids"] for r in records(cut)]

    p = subprocess.run(cmd(cut), cwd=ROOT, capture_output=True, text=True, timeout=600)  # complete: skipped
    assert p.returncode == 0 and "job skipped" in p.stderr

    p = subprocess.run(cmd(cut, "bc=10"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "holds records of a different job configuration" in p.stderr


def test_records_of_other_code_are_not_silently_kept(tmp_path):
    """A job folder whose records were made by another commit is refused (naming the folder and the way
    out), unless +force=true keeps them."""
    import pytest

    from mtp.errors import ConfigError
    from run import run_any

    from .conftest import compose_cfg

    overrides = ["model=tiny_llama", "method=pld", "task.limit=2", "max_new_tokens=6", "bc=10"]
    first, _ = run_any(compose_cfg(overrides), tmp_path)
    job = json.loads((tmp_path / "job.json").read_text())
    job["git"]["git"] = "0" * 40  # as if an older commit had made these records
    (tmp_path / "job.json").write_text(json.dumps(job))
    with pytest.raises(ConfigError, match=f"{tmp_path} holds records made by the code at git 0000000000"):
        run_any(compose_cfg(overrides), tmp_path)
    summary, _ = run_any(compose_cfg(overrides + ["+force=true"]), tmp_path)  # the recorded job, kept
    assert summary["n_turns"] == first["n_turns"] and summary["fingerprint"] == first["fingerprint"]


def test_a_forced_rerun_of_a_sweep_resumes_in_the_same_folders(tmp_path):
    """+force=true (keep records of another commit) does not rename a sweep's job folders: the rerun finds
    and resumes the jobs it names."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "run.py", "experiment=fig4", "model=tiny_llama", "method=pld", "bc=10", "task.limit=1",
            "max_new_tokens=4", "wandb.mode=disabled", f"hydra.sweep.dir={sweep}"]
    for extra in ([], ["+force=true"]):
        p = subprocess.run(args + extra, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    jobs = [d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(jobs) == 1 and "force" not in jobs[0], jobs
