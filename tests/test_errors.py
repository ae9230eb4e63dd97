"""Bad input: one clear error line and a non-zero exit, before any model load where the input allows it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mtp.runner
from mtp.cli import check_command_line, choices
from mtp.data import DataError
from mtp.errors import ConfigError
from mtp.models import ModelLoadError, load_model
from run import run_any

from .conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "run.py", *args, "wandb.mode=disabled"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=None if env is None else os.environ | env)


@pytest.mark.parametrize("arg,message", [
    ("model=llama3_9b", "unknown model 'llama3_9b'; valid: gemma3_270m, llama3_2_3b, llama3_8b, qwen3_32b, qwen3_8b, smollm2_135m"),
    ("method=eagle", f"unknown method 'eagle'; valid: {', '.join(choices('method'))}"),
    ("method=pld,eagle", "unknown method 'eagle'"),
    ("task=gsm8k", "unknown task 'gsm8k'; valid: dolly_creative, math_reasoning, mt_bench"),
    ("experiment=table9", "unknown experiment 'table9'; valid: bc120, esp_plus_ablation, fig2"),
    ("+esp_tree=bc30_1_1", "unknown esp_tree 'bc30_1_1'"),
    ("arm=esp_plus_typo", f"unknown arm 'esp_plus_typo'; valid: {', '.join(choices('arm'))}"),
])
def test_unknown_choice_lists_the_valid_ones(arg, message):
    assert message in check_command_line([arg])


def test_unknown_choice_on_the_command_line():
    t0 = time.perf_counter()
    p = cli("model=llama3_9b")
    assert p.returncode == 2 and p.stderr.startswith("error: unknown model 'llama3_9b'; valid:")
    assert time.perf_counter() - t0 < 60 and "Traceback" not in p.stderr


def test_unwritable_results_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "cannot write results to" in check_command_line([f"hydra.run.dir={blocker}/run"])
    p = cli("model=tiny_llama", f"hydra.sweep.dir={blocker}/sweep", "-m")
    assert p.returncode == 2 and p.stderr.startswith(f"error: cannot write results to {blocker}/sweep (")
    assert check_command_line([f"hydra.run.dir={tmp_path}/ok"]) is None


@pytest.fixture
def no_model_load(monkeypatch):
    """Settings errors must come before the (slow) model load."""
    def refuse(cfg):
        raise AssertionError("the model was loaded before the bad setting was reported")

    monkeypatch.setattr(mtp.runner, "load_model", refuse)


@pytest.mark.parametrize("overrides,message", [
    (["bc=abc"], "bc='abc' must be an integer (e.g. bc=30)"),
    (["bc=2.5"], "bc=2.5 must be an integer"),
    (["bc=0"], "bc=0: the block complexity (tokens per forward) must be >= 1"),
    (["method=esp", "method.k=2", "bc=5"], "bc=5 is too small"),
    (["method=esp", "bc=3"], "bc=3 is too small for ESP with k=1 masks: needs bc >= 4"),
    (["method=esp", "method.widths=[9]", "bc=10"], "ESP widths [9] with k=1 feed 20 tokens per forward, more than bc=10"),
    (["method=lade", "bc=3"], "bc=3 is too small for Lookahead decoding"),
    (["method=pld", "bc=1"], "bc=1 is below method pld's minimum block complexity 2"),
    (["max_new_tokens=0"], "max_new_tokens=0 must be > 0"),
    (["repeats=0"], "repeats=0 must be >= 1"),
    (["max_new_tokens=-5"], "max_new_tokens=-5 must be > 0"),
    (["temperature=-0.5"], "temperature=-0.5 must be a number >= 0"),
    (["job=sweep"], "job='sweep': expected decode or alignment"),
    (["method.tree=bushy"], "method.tree='bushy': expected one of ['static', 'dynamic']"),
    # the mask component validates its options for every method that has masks
    (["method.init=Mean"], "method.init='Mean': expected one of ['mean', 'last_k', 'sample', 'ood', 'recent']"),
    (["method=esp_plus", "method.init=Mean"], "method.init='Mean': expected one of ['mean', 'last_k', 'sample', 'ood', 'recent']"),
    (["method=esp_plus", "method.ema=tokens"], "method.ema='tokens': expected one of ['token', 'step']"),
    (["method=esp_plus", "method.sources=[recycling]", "method.init=Mean"], "method.init='Mean': expected one of"),
    (["method=esp_plus", "method.momentum=1.5"], "method.momentum=1.5: expected 0 <= momentum < 1"),
])
def test_bad_settings_before_model_load(tmp_path, no_model_load, overrides, message):
    cfg = compose_cfg(["model=tiny_llama", "task.limit=1", *overrides])
    with pytest.raises(ConfigError) as e:
        run_any(cfg, tmp_path)
    assert message in str(e.value)


def _prompts(tmp_path, turns):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": t}) + "\n" for i, t in enumerate(turns)))
    return f


@pytest.mark.parametrize("content,message", [
    (None, "prompt file not found: "),
    ([[""]], r":1: 'turns' must be a non-empty list of non-empty strings"),
    ([["   "]], r":1: 'turns' must be a non-empty list of non-empty strings"),
])
def test_bad_prompt_files_before_model_load(tmp_path, no_model_load, content, message):
    path = tmp_path / "missing.jsonl" if content is None else _prompts(tmp_path, content)
    cfg = compose_cfg(["model=tiny_llama", f"task.path={path}"])
    with pytest.raises(DataError) as e:
        run_any(cfg, tmp_path / "out")
    assert message in str(e.value)


def test_prompt_longer_than_the_context_says_by_how_much(tmp_path):
    path = _prompts(tmp_path, [["short"], ["x" * 200]])  # byte tokenizer: ~200 tokens + the chat template
    cfg = compose_cfg(["model=tiny_llama", "task=spec_bench", f"task.path={path}", "model.config.max_position_embeddings=128",
                       "max_new_tokens=4", "wandb.mode=disabled"])
    with pytest.raises(DataError) as e:
        run_any(cfg, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith("question 1 turn 0: the prompt is ") and "more than tiny_llama's context of 128 positions" in msg
    n = int(msg.split("the prompt is ")[1].split(" tokens")[0])
    assert f", {n - 128} more than" in msg
    assert not (tmp_path / "out" / "records.jsonl").exists()  # refused before generating anything


def test_unreadable_local_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    cfg = compose_cfg(["model=llama3_8b", "model.device=cpu", f"model.path={tmp_path}"])
    with pytest.raises(ModelLoadError) as e:
        load_model(cfg.model)
    msg = str(e.value)
    assert f"cannot load '{tmp_path}'" in msg and "model.path=/path/to/local/dir" in msg


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    cfg = compose_cfg(["model=llama3_8b", "model.device=cpu", "model.path=some-org/some-model"])
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model(cfg.model)
    assert time.perf_counter() - t0 < 20
    assert "is not in the local hub cache and the hub (http://127.0.0.1:9) is unreachable" in str(e.value)
    assert "model.path=/path/to/local/dir" in str(e.value)


def test_corrupt_cached_weights_say_how_to_recover(tmp_path, monkeypatch):
    from mtp import models

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "gguf_path", lambda package, filename: src)
    cfg = OmegaConf.merge(compose_cfg(["model=smollm2_135m"]).model, {"cache_dir": str(tmp_path / "cache")})
    key = models.hashlib.sha1(f"{src.name}:{src.stat().st_size}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    cache = tmp_path / "cache" / f"smollm2_135m-{key}"
    cache.mkdir(parents=True)
    (cache / "model.safetensors").write_bytes(b"not safetensors")
    (cache / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as e:
        load_model(cfg)
    assert f"the cached weights in {cache} cannot be read" in str(e.value) and "delete that folder" in str(e.value)
