"""Benchmark suite: how close each method's decode step comes to the bare model forward, and what that
means for speed. One command writes `BENCHMARKS.md` and a JSON of every number:

    python -m experiments.bench                                  # SmolLM2, every method, bc 10/30/60
    python -m experiments.bench --methods esp pld --bcs 30 --max-new-tokens 32 --out /tmp/b.md

For each method and bc, on the same prompts, in the same process (every figure is a ratio or a median
measured in this run):
- step: time per decode step of the method = (generation time − prefill time) / decode calls, and the
  part of it spent in the model call (timed inside the loop, with a device sync on a GPU);
- loop overhead = step / model call − 1: the loop's own cost per step (drafting, masks, verification,
  KV compaction, bookkeeping) relative to the forward it wraps;
- t_fwd(T): median time of a bare model forward of T tokens on a cache of the run's mean cache length,
  measured right after the run;
- τ, tokens/s, speedup = AR time / method time on the same prompts (interleaved), and the bound
  τ · t_fwd(1) / t_fwd(bc) that a loop without overhead would reach;
- peak memory (process RSS on CPU; allocated CUDA memory on a GPU) and the model load time, from the
  GGUF (cold, dequantized into an empty cache) and from the cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mtp.cli import compose
from mtp.data import load_questions
from mtp.kv import keep_rows, new_cache
from mtp.loop import Decoder, Drafter
from mtp.models import chat_ids, load_model, stop_ids
from mtp.runner import build_drafter, environment, write_atomic

METHODS = ["ar", "pld", "lade", "stand", "recycling", "esp"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_forward_s(model, cache_len: int, n_tokens: int, repeats: int) -> float:
    """Median seconds of one model forward of `n_tokens` (a chain, causal) on a `cache_len`-token cache."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    cache = new_cache(model.config, cache_len + n_tokens)  # the decode loop's cache
    model(input_ids=torch.randint(0, V, (1, cache_len), generator=g).to(device), past_key_values=cache, use_cache=True)
    ids = torch.randint(0, V, (1, n_tokens), generator=g).to(device)
    local = torch.full((n_tokens, n_tokens), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    mask = torch.cat([torch.zeros(n_tokens, cache_len, dtype=dtype, device=device), local], 1)[None, None]
    pos = torch.arange(cache_len, cache_len + n_tokens, device=device)[None]
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        keep_rows(cache, cache_len, [])  # back to the cache length
    return statistics.median(times[1:])


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_times(model_name: str) -> dict:
    """Seconds to load the model from the cache, and (packaged GGUF only) cold from the GGUF."""
    cfg = compose([f"model={model_name}"]).model
    out = {}
    if cfg.source == "gguf_package":
        with tempfile.TemporaryDirectory() as tmp:
            cold = OmegaConf.merge(cfg, {"cache_dir": tmp})
            t0 = time.perf_counter()
            load_model(cold)
            out["cold_gguf_s"] = time.perf_counter() - t0
    load_model(cfg)  # make sure the cache exists, then time a load from it
    t0 = time.perf_counter()
    load_model(cfg)
    out["cached_s"] = time.perf_counter() - t0
    return out


def run_bench(args) -> dict:
    base = [f"model={args.model}", "task=spec_bench", f"task.per_task={args.per_task}", f"max_new_tokens={args.max_new_tokens}"]
    cfg = compose(base)
    loads = load_times(args.model) if args.load_times else {}
    model, tok = load_model(cfg.model)
    device = next(model.parameters()).device
    prompts = [chat_ids(tok, [{"role": "user", "content": q.turns[0]}], cfg.model.get("thinking"))
               for q in load_questions(cfg.task)]
    decoder = Decoder(model, stop_ids(model, tok))
    ar = Drafter()

    def generate(drafter, ids):
        return decoder.generate(drafter, ids, args.max_new_tokens)

    generate(ar, prompts[0][:64])  # warm-up, untimed (each method is warmed up before its run)

    def t_fwd(cache_len: float, n: int) -> float:  # measured right after each run: the run's conditions
        return bare_forward_s(model, int(round(cache_len)), n, args.repeats)

    rows = []
    total = sum(1 if m == "ar" else len(args.bcs) for m in args.methods)
    done = 0
    for method in args.methods:
        for bc in ([1] if method == "ar" else args.bcs):
            done += 1
            print(f"[bench] {done}/{total} {method} bc={bc}", file=sys.stderr, flush=True)
            drafter = ar if method == "ar" else build_drafter(compose(base + [f"method={method}", f"bc={bc}"]))
            drafter.setup(model)
            generate(drafter, prompts[0][:64])  # warm-up
            drafter.setup(model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            gens, ar_gens = [], []
            for ids in prompts:  # interleaved: AR then the method on each prompt
                ar_gens.append(generate(ar, ids))
                gens.append(generate(drafter, ids))
            ar_wall = sum(g.wall_s for g in ar_gens)
            wall = sum(g.wall_s for g in gens)
            calls = sum(g.decode_calls for g in gens)
            steps_s = sum(g.wall_s - g.prefill_s for g in gens)
            fed = sum(g.tokens_fed_sum for g in gens) / calls
            # mean cache length over the decode steps: prompt + about half of the new tokens
            cache_len = sum((len(g.prompt_ids) + len(g.new_ids) / 2) * g.decode_calls for g in gens) / calls
            step, fwd_in_loop = steps_s / calls, sum(g.forward_s for g in gens) / calls
            t1 = t_fwd(cache_len, 1)
            t_bc = t1 if bc == 1 else t_fwd(cache_len, bc)
            tau = sum(sum(g.committed_per_step) for g in gens) / calls
            rows.append({
                "method": method, "bc": bc if method != "ar" else None, "tau": tau,
                "tokens_per_s": sum(len(g.new_ids) for g in gens) / wall, "speedup": ar_wall / wall,
                "bound": tau * t1 / t_bc, "step_ms": 1e3 * step, "mean_tokens_fed": fed,
                "model_call_ms": 1e3 * fwd_in_loop, "loop_overhead": step / fwd_in_loop - 1,
                "fwd_1_ms": 1e3 * t1, "fwd_bc_ms": 1e3 * t_bc, "cache_len": cache_len, "decode_calls": calls,
                "lossless": all(g.new_ids == a.new_ids for g, a in zip(gens, ar_gens)), "peak_mem_mb": peak_memory_mb(device),
            })
    env = environment(model)
    return {"conditions": {
        "model": args.model, "dtype": env["dtype"], "device": env["device_name"], "threads": env["threads"],
        "torch": env["torch"], "transformers": env["transformers"], "python": platform.python_version(),
        "git": env["git"], "git_dirty": env["git_dirty"], "prompts": f"Spec-Bench, first turn of the first {args.per_task} "
        f"question(s) of each task ({len(prompts)} prompts)", "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "machine": platform.node()},
        "load": loads, "runs": rows}


def to_markdown(res: dict) -> str:
    c = res["conditions"]
    lines = [
        f"## {c['model']} on {c['device']} ({c['dtype']}, {c['threads']} threads)", "",
        f"Generated by `python -m experiments.bench` (git {c['git'][:10]}{'+dirty' if c['git_dirty'] else ''}); torch "
        f"{c['torch']}, transformers {c['transformers']}, Python {c['python']}. Prompts: {c['prompts']}; "
        f"max_new_tokens {c['max_new_tokens']}; bare forwards: median of {c['repeats']}.", "",
        "| method | bc | τ | tokens/s | speedup vs AR | bound τ·t(1)/t(bc) | step (ms) | model call (ms) | "
        "loop overhead | tokens fed / step | t(1) (ms) | t(bc) (ms) | lossless | peak mem (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['method']} | {r['bc'] or '—'} | {r['tau']:.3f} | {r['tokens_per_s']:.1f} | {r['speedup']:.3f} | "
            f"{r['bound']:.3f} | {r['step_ms']:.1f} | {r['model_call_ms']:.1f} | {100 * r['loop_overhead']:+.1f}% | "
            f"{r['mean_tokens_fed']:.1f} | {r['fwd_1_ms']:.1f} | {r['fwd_bc_ms']:.1f} | {r['lossless']} | "
            f"{r['peak_mem_mb']:.0f} |")
    if res["load"]:
        lines += ["", "Model load: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in res["load"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--bcs", nargs="+", type=int, default=[10, 30, 60])
    ap.add_argument("--per-task", type=int, default=1, help="first N questions of each Spec-Bench task")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats of each bare forward (median)")
    ap.add_argument("--no-load-times", dest="load_times", action="store_false", help="skip the (cold ~40 s) load timing")
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    args = ap.parse_args(argv)
    res = run_bench(args)
    header = ("# Benchmarks\n\nEvery number below comes from one run of the command in its section; ratios are "
              "measured within that run. On a shared CPU absolute times are noisy: read the ratios.\n\n")
    json_path = args.json or args.out.with_suffix(".json")
    write_atomic(json_path, json.dumps(res, indent=2))
    write_atomic(args.out, header + to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
