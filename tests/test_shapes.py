"""Shape models: each paper model's exact architecture with random weights, from an inline config (no hub), for
speed studies; a job on one says so and stays out of the tables."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.results import load_runs
from experiments.tables import jobs
from mtp.models import random_model

from .conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent
# parameter counts the model cards publish
PUBLISHED = {"llama3_2_3b": 3.21e9, "llama3_8b": 8.03e9, "qwen3_8b": 8.19e9, "qwen3_32b": 32.8e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_paper_model_has_its_exact_shape(name):
    cfg = compose_cfg([f"model={name}", "model.random_weights=true"]).model
    shape = dict(cfg.shape)
    model, _ = random_model(shape.pop("arch"), shape, 0, torch.bfloat16, device="meta")  # no memory
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PUBLISHED[name] - 1) < 0.005, n


def test_a_job_on_random_weights_runs_and_is_left_out_of_the_tables(tmp_path):
    out = tmp_path / "job"
    p = subprocess.run([sys.executable, "run.py", "model=llama3_8b", "model.random_weights=true", "model.device=cpu",
                        "model.dtype=float32", "model.shape.hidden_size=64", "model.shape.intermediate_size=128",
                        "model.shape.num_hidden_layers=1", "model.shape.head_dim=16", "model.shape.num_attention_heads=4",
                        "model.shape.num_key_value_heads=2", "method=esp", "bc=10", "task.limit=2", "max_new_tokens=6",
                        "wandb.mode=disabled", f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RANDOM WEIGHTS" in p.stdout
    assert json.loads((out / "summary.json").read_text())["random_weights"] is True
    runs = load_runs(tmp_path)
    assert list(runs.status) == ["random weights"] and jobs(runs).empty
