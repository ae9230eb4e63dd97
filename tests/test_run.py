"""run.py end to end in subprocesses: one job and one Hydra multirun on tiny models."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD_KEYS = {"question_id", "category", "task", "turn", "ids", "new_tokens", "decode_calls", "tokens_fed_max",
               "tokens_fed_mean", "accept_hist", "wall_s", "ar_wall_s", "matches_ar", "first_diff"}
SUMMARY_KEYS = {"tau", "speedup", "tokens_per_s", "ar_tokens_per_s", "decode_calls", "call_reduction", "new_tokens",
                "max_tokens_per_forward", "lossless", "n_prompts", "config", "environment"}


def run(args, tmp_path, wandb="disabled"):
    return subprocess.run([sys.executable, "run.py", *args, f"wandb.mode={wandb}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_one_job_writes_records_and_summary(tmp_path):
    out = tmp_path / "job"
    p = run(["model=tiny_llama", "method=ar", "task=mt_bench", "task.limit=2", "max_new_tokens=12", f"hydra.run.dir={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 4  # 2 questions x 2 turns
    for r in records:
        assert RECORD_KEYS <= set(r) and r["matches_ar"] and r["new_tokens"] <= 12
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["tau"] == 1.0 and summary["lossless"] == "exact" and summary["n_prompts"] == 2
    assert summary["environment"]["torch"] and summary["config"]["model"]["name"] == "tiny_llama"
    assert "tau (tokens/step)" in p.stdout


def test_multirun_sweeps_models_and_bc(tmp_path):
    p = run(["-m", "model=tiny_llama,tiny_qwen3", "bc=10,30", "task.limit=1", "task.categories=[qa]",
             "max_new_tokens=4", f"hydra.sweep.dir={tmp_path}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 4
    loaded = [json.loads(s.read_text()) for s in summaries]
    assert {(s["model"], s["bc"]) for s in loaded} == {(m, b) for m in ("tiny_llama", "tiny_qwen3") for b in (10, 30)}
    for s in loaded:  # the default method (ESP) fits itself to each bc and stays lossless
        assert s["method"] == "esp" and s["lossless"] == "exact" and s["max_tokens_per_forward"] <= s["bc"]


def test_bad_setting_fails_before_loading(tmp_path):
    p = run(["model=tiny_llama", "max_new_tokens=0", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert p.returncode == 2 and "error: max_new_tokens=0 must be > 0" in p.stderr


def test_wandb_offline_writes_a_run(tmp_path):
    p = run(["model=tiny_llama", "task.limit=1", "max_new_tokens=4", f"hydra.run.dir={tmp_path}"], tmp_path, wandb="offline")
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_repeats_time_again_without_changing_the_job(tmp_path):
    """repeats=3 times each turn's AR + method pair three times; the method repeats from a copy of its
    state, so Token Recycling's job-level matrix, the ids and τ are those of repeats=1."""
    from run import run_any

    from .conftest import compose_cfg

    base = ["model=tiny_llama", "method=recycling", "task.limit=3", "max_new_tokens=16", "bc=10", "wandb.mode=disabled"]
    once, _ = run_any(compose_cfg(base), tmp_path / "once")
    thrice, text = run_any(compose_cfg(base + ["repeats=3"]), tmp_path / "thrice")
    assert thrice["tau"] == once["tau"] and thrice["decode_calls"] == once["decode_calls"] and thrice["lossless"] == "exact"
    r = thrice["speedup_repeats"]
    assert r["n"] == 3 and r["min"] <= r["median"] <= r["max"] and "3 repeats" in text
    ids = lambda d: [json.loads(line)["ids"] for line in (d / "records.jsonl").read_text().splitlines()]  # noqa: E731
    assert ids(tmp_path / "once") == ids(tmp_path / "thrice")
