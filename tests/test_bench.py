"""The benchmark command runs end to end (tiny model) and writes its Markdown and JSON."""

import json

from experiments.bench import main


def test_bench_writes_markdown_and_json(tmp_path, one_thread):
    out = tmp_path / "B.md"
    main(["--model", "tiny_llama", "--methods", "ar", "pld", "esp", "--bcs", "10", "--max-new-tokens", "6",
          "--repeats", "1", "--per-task", "1", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert [(r["method"], r["bc"]) for r in res["runs"]] == [("ar", None), ("pld", 10), ("esp", 10)]
    for r in res["runs"]:
        assert r["lossless"] and r["fwd_1_ms"] > 0 and r["mean_tokens_fed"] <= (r["bc"] or 1)
        assert 0 < r["model_call_ms"] < r["step_ms"]  # the model call is part of the step
        assert abs(r["loop_overhead"] - (r["step_ms"] / r["model_call_ms"] - 1)) < 1e-9
    assert res["runs"][0]["tau"] == 1.0 and res["load"]["cached_s"] >= 0
    md = out.read_text()
    assert md.startswith("# Benchmarks") and "| esp | 10 |" in md and "tiny_llama on " in md
