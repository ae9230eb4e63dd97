"""The GPU study's CPU rehearsal: the exact command, at toy scale, end to end, so the borrowed GPU's run is not
the first run."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_study_rehearses_on_cpu(tmp_path):
    out = tmp_path / "BENCHMARKS_GPU.md"
    p = subprocess.run([sys.executable, "-m", "experiments.gpu_study", "--rehearse", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert [c["model"] for c in res["curves"]] == ["tiny_llama", "llama3_8b", "qwen3_8b"]  # tiny for SmolLM2
    assert all(c["cost"]["1"] == 1.0 and c["t_ms"]["10"] > 0 for c in res["curves"])
    assert [m["dtype"] for m in res["methods"]] == ["float32", "bfloat16"]
    for block in res["methods"]:
        assert [(r["method"], r["bc"]) for r in block["runs"]] == [("ar", None), ("esp", 10), ("esp_naive", 10)]
        assert all(r["lossless"] in ("exact", "numeric_ties (1)", "numeric_ties (2)") for r in block["runs"])
    assert res["ties"]["tie_gap_bound"] >= 0 and res["conditions"]["rehearse"] is True
    md = out.read_text()
    for section in ("## 1. Forward cost", "## 2. SmolLM2 on the device", "### bfloat16", "ESP efficient vs naive",
                    "## 3. bf16 rounding on the device", "REHEARSAL on CPU"):
        assert section in md, section


def test_the_bundle_holds_the_wheels_and_the_gguf_in_parts(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.gpu_study", "--bundle", str(tmp_path / "b")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = sorted((tmp_path / "b").glob("gguf.part*"))
    assert len(parts) >= 2 and all(q.stat().st_size <= 60 * 10**6 for q in parts)
    wheels = {w.name.split("-")[0].lower() for w in (tmp_path / "b" / "wheels").glob("*.whl")}
    assert {"hydra_core", "omegaconf", "gguf"} <= wheels
