"""The benchmark command runs end to end (tiny model) and writes its Markdown and JSON."""

import json

from experiments.bench import main, within_bound


def test_bench_writes_markdown_and_json(tmp_path, one_thread):
    out = tmp_path / "B.md"
    main(["--model", "tiny_llama", "--methods", "ar", "pld", "esp", "esp_naive", "--bcs", "10", "--max-new-tokens", "6",
          "--repeats", "1", "--per-task", "1", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert [(r["method"], r["bc"]) for r in res["runs"]] == [("ar", None), ("pld", 10), ("esp", 10), ("esp_naive", 10)]
    for r in res["runs"]:
        assert r["lossless"] == "exact" and r["fwd_1_ms"] > 0 and r["mean_tokens_fed"] <= (r["bc"] or 1)
        assert 0 < r["model_call_ms"] < r["step_ms"]  # the model call is part of the step
        assert r["decode_speedup"] > 0 and r["bound"] > 0
        assert abs(r["loop_overhead"] - (r["step_ms"] / r["model_call_ms"] - 1)) < 1e-9
    assert res["runs"][0]["tau"] == 1.0 and res["load"]["cached_s"] >= 0
    study = {r["variant"].split(" (")[0]: r for r in res["study"]}
    assert {"eager attention", "1 thread", "torch.no_grad", "bfloat16 weights"} <= set(study)
    assert study["bfloat16 weights"]["lossless_own_numerics"] is True and study["eager attention"]["t1_ms"] > 0
    assert res["profile"]["ops"] and 0 < res["profile"]["total_ms"] and res["profile"]["decode_calls"] > 0
    md = out.read_text()
    assert md.startswith("# Benchmarks") and "| esp | 10 |" in md and "tiny_llama on " in md
    assert "| decode-only speedup | bound | ≤ bound |" in md
    assert "naive/efficient" in md and "### Speed of the model forward" in md and "torch.profiler" in md


def test_within_bound_allows_the_interval_and_flags_a_speedup_beyond_it():
    assert within_bound({"decode_speedup": 0.9, "decode_speedup_ci": [0.8, 1.0], "bound": 0.95}) == "yes"
    assert within_bound({"decode_speedup": 1.0, "decode_speedup_ci": [0.9, 1.1], "bound": 0.95}) == "yes"  # within noise
    assert within_bound({"decode_speedup": 1.0, "decode_speedup_ci": [0.97, 1.03], "bound": 0.95}) == "NO"
    assert within_bound({"decode_speedup": 1.0, "decode_speedup_ci": None, "bound": 0.95}) == "NO"  # one prompt: no interval
