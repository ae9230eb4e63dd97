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
- τ, tokens/s, speedup = AR time / method time on the same prompts (interleaved), the decode-only speedup
  (the prefill, the same forward on both sides, left out of both) with its 95% bootstrap interval over the
  prompts, and the bound τ · t_call(AR) / t_call(method) that a loop without overhead would reach, from the
  model-call times inside the loop (AR's steps are interleaved with the method's, so both see the same
  machine state): a decode-only figure, compared with the decode-only speedup;
- ESP's efficient implementation (static layout built once) against the naive one (rebuilt every step);
- a CPU/GPU speed study of the model's forward (attention kernel, threads, grad mode, bf16, and with
  `--compile` torch.compile), each variant timed alternately with the shipped setting, and a
  torch.profiler breakdown of ESP's decode steps by operator;
- peak memory (process RSS on CPU; allocated CUDA memory on a GPU) and the model load time, from the
  GGUF (cold, dequantized into an empty cache) and from the cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mtp.cli import choices, compose, search_path_overrides
from mtp.data import load_questions, warmup_question
from mtp.loop import Decoder, Drafter, bare_forward_s, sync
from mtp.lossless import lossless_label
from mtp.metrics import summarize
from mtp.models import chat_ids, load_model, stop_ids
from mtp.runner import build_drafter, environment, first_difference, run_turn, warm_up, write_atomic

# every method of conf/method/ (AR included) and ESP's naive layout, the bench's own variant of ESP
EXTRA = {"esp_naive": ["method=esp", "method.impl=naive"]}


def method_overrides(name: str) -> list[str]:
    return EXTRA[name] if name in EXTRA else [f"method={name}"]


def bench_methods(config_dirs=()) -> list[str]:
    """What `--methods` accepts: every method config (conf/method/ and any extra config folder) + EXTRA."""
    methods = choices("method", config_dirs)
    return ["ar"] + [m for m in methods if m != "ar"] + list(EXTRA)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_times(model_name: str, overrides=()) -> dict:
    """Seconds to load the model from the cache, and (packaged GGUF only) cold from the GGUF."""
    cfg = compose([f"model={model_name}", *overrides]).model
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
    base = [*search_path_overrides(args.config_dir), f"model={args.model}", "task=spec_bench",
            f"task.per_task={args.per_task}", f"max_new_tokens={args.max_new_tokens}", *args.overrides]
    cfg = compose(base)
    loads = load_times(args.model, args.overrides) if args.load_times else {}
    model, tok = load_model(cfg.model)
    device = next(model.parameters()).device
    questions = load_questions(cfg.task)
    prompts = [chat_ids(tok, [{"role": "user", "content": q.turns[0]}], cfg.model.get("thinking")) for q in questions]
    decoder = Decoder(model, stop_ids(model, tok))
    ar = Drafter()
    warm = chat_ids(tok, [{"role": "user", "content": warmup_question(cfg.task).turns[0]}], cfg.model.get("thinking"))

    def t_fwd(cache_len: float, n: int) -> float:  # measured right after each run: the run's conditions
        return bare_forward_s(model, int(round(cache_len)), n, args.repeats)

    def job_cfg(method, bc):
        return compose(base + method_overrides(method) + [f"bc={bc}"])

    rows = []
    total = sum(1 if m == "ar" else len(args.bcs) for m in args.methods)
    for method in args.methods:
        for bc in ([1] if method == "ar" else args.bcs):
            print(f"[bench] {len(rows) + 1}/{total} {method} bc={bc}", file=sys.stderr, flush=True)
            job = job_cfg(method, bc)
            drafter = build_drafter(job)
            drafter.setup(model)
            warm_up(decoder, [ar, drafter], warm, job.warmup_tokens)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # the job's own turn function: AR then the method on each prompt, interleaved
            records = [{"question_id": q.question_id, "category": q.category, "task": q.task, "turn": 0}
                       | run_turn(job, model, decoder, drafter, ar, ids, ids) for q, ids in zip(questions, prompts)]
            s = summarize(records)
            calls = s["decode_calls"]
            # mean cache length over the decode steps: prompt + about half of the new tokens
            cache_len = sum((r["prompt_tokens"] + r["new_tokens"] / 2) * r["decode_calls"] for r in records) / calls
            t1 = t_fwd(cache_len, 1)
            t_bc = t1 if bc == 1 else t_fwd(cache_len, bc)
            rows.append({
                "method": method, "bc": bc if method != "ar" else None, "tau": s["tau"],
                "tokens_per_s": s["tokens_per_s"], "speedup": s["speedup"], "decode_speedup": s["decode_speedup"],
                "decode_speedup_ci": s["ci"].get("decode_speedup"), "tau_ci": s["ci"].get("tau"), "bound": s["bound"], "step_ms": 1e3 * s["step_s"],
                "mean_tokens_fed": s["mean_tokens_per_forward"], "model_call_ms": 1e3 * s["model_call_s"],
                "ar_model_call_ms": 1e3 * s["ar_model_call_s"], "loop_overhead": s["loop_overhead"],
                "fwd_1_ms": 1e3 * t1, "fwd_bc_ms": 1e3 * t_bc, "cache_len": cache_len, "decode_calls": calls,
                "lossless": lossless_label(s), "peak_mem_mb": peak_memory_mb(device),
            })
    study = speed_study(model, cfg, prompts[0], decoder.eos, args) if args.study else []
    profile = profile_steps(decoder, build_drafter(job_cfg("esp", 30)), prompts[0], args) if args.profile else None
    env = environment(model)
    return {"conditions": {
        "command": "python -m experiments.bench" + "".join(f" {a}" for a in args.argv),
        "model": args.model, "dtype": env["dtype"], "device": env["device_name"], "threads": env["threads"],
        "torch": env["torch"], "transformers": env["transformers"], "python": platform.python_version(),
        "git": env["git"], "git_dirty": env["git_dirty"], "prompts": f"Spec-Bench, first turn of the first {args.per_task} "
        f"question(s) of each task ({len(prompts)} prompts)", "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats, "machine": platform.node()},
        "load": loads, "runs": rows, "study": study, "profile": profile}


def speed_study(model, cfg, prompt: list[int], eos, args) -> list[dict]:
    """The model forward under each variant, timed alternately with the shipped setting (fp32, sdpa, all
    threads, inference_mode): t(1) and t(30) on a cache of the first prompt's length, their ratios to
    the shipped setting measured beside them, and for variants that change numerics whether greedy
    decoding stays lossless in that variant's own numerics (AR vs ESP bc 30 on the first prompt)."""
    n_ctx, reps = len(prompt), args.repeats
    threads = torch.get_num_threads()

    def times(m, grad_mode=torch.inference_mode):
        return bare_forward_s(m, n_ctx, 1, reps, grad_mode), bare_forward_s(m, n_ctx, 30, reps, grad_mode)

    def lossless(m) -> bool | dict:
        """True, or where ESP's output first leaves AR's, with the variant's top-2 logit gap there and its
        class (a numeric tie of the variant's dtype, or a defect)."""
        dec = Decoder(m, eos)
        esp = build_drafter(compose([f"model={args.model}", *args.overrides, "method=esp", "bc=30"]))
        esp.setup(m)
        n = min(args.max_new_tokens, 32)
        ids, ar_ids = dec.generate(esp, prompt, n).new_ids, dec.generate(Drafter(), prompt, n).new_ids
        return True if ids == ar_ids else first_difference(m, prompt, ids, ar_ids)

    def variant(name, setup, teardown, grad_mode=torch.inference_mode, check=None, note=""):
        print(f"[bench] speed study: {name}", file=sys.stderr, flush=True)
        b1, b30 = times(model)
        t_setup = time.perf_counter()
        m = setup()
        v1, v30 = times(m, grad_mode)
        t_setup = time.perf_counter() - t_setup
        row = {"variant": name, "base_1_ms": 1e3 * b1, "base_30_ms": 1e3 * b30, "t1_ms": 1e3 * v1, "t30_ms": 1e3 * v30,
               "speedup_1": b1 / v1, "speedup_30": b30 / v30, "setup_and_timing_s": t_setup,
               "lossless_own_numerics": check(m) if check else None, "note": note}
        teardown(m)
        return row

    out = []
    shipped_attn = model.config._attn_implementation
    out.append(variant(f"eager attention (shipped: {shipped_attn})", lambda: (model.set_attn_implementation("eager"), model)[1],
                       lambda m: m.set_attn_implementation(shipped_attn)))
    out.append(variant(f"1 thread (shipped: {threads})", lambda: (torch.set_num_threads(1), model)[1],
                       lambda m: torch.set_num_threads(threads)))
    out.append(variant("torch.no_grad (shipped: inference_mode)", lambda: model, lambda m: None, grad_mode=torch.no_grad))
    out.append(variant("bfloat16 weights (shipped: float32)", lambda: load_model(OmegaConf.merge(cfg.model, {"dtype": "bfloat16"}))[0],
                       lambda m: None, check=lossless))
    if args.compile:
        def compiled():
            m = load_model(cfg.model)[0]
            m.forward = torch.compile(m.forward, dynamic=True)
            return m
        out.append(variant("torch.compile(dynamic=True)", compiled, lambda m: None, check=lossless,
                           note="setup time includes compilation"))
    # the memory-bandwidth floor of a 1-token forward: every weight read once
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.empty(n_bytes // 4, device=next(model.parameters()).device)
    y = torch.empty_like(x)
    best = min(_timed(lambda: y.copy_(x), x.device) for _ in range(5))
    out.append({"variant": "floor: weights / copy bandwidth", "weights_mb": n_bytes / 2**20,
                "copy_gb_s": 2 * n_bytes / best / 1e9, "t1_ms": 1e3 * best / 2})
    return out


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def profile_steps(decoder, drafter, prompt: list[int], args) -> dict:
    """torch.profiler over one ESP bc-30 generation: the operators that take a decode's time."""
    from torch.profiler import ProfilerActivity, profile

    drafter.setup(decoder.model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if decoder.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        gen = decoder.generate(drafter, prompt, min(args.max_new_tokens, 32))
    cuda = decoder.device.type == "cuda"
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events)
    top = sorted(events, key=key, reverse=True)[:10]
    return {"method": "esp", "bc": 30, "decode_calls": gen.decode_calls, "clock": "device" if cuda else "cpu",
            "total_ms": total / 1e3, "wall_ms": 1e3 * gen.wall_s, "ops": [{"op": e.key, "calls": e.count, "self_ms": key(e) / 1e3,
                                               "share": key(e) / total} for e in top]}


def with_interval(value: float, ci) -> str:
    """`0.437 [0.378, 0.507]`, or the bare value without an interval."""
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def within_bound(row: dict) -> str:
    """"yes" when the decode-only speedup is at or below the bound, or above it by less than its interval
    (the interval's lower end is at or below the bound); "NO" otherwise: the loop would have beaten a loop
    with no cost of its own, so one of the two is mismeasured."""
    lo = (row.get("decode_speedup_ci") or [row["decode_speedup"]])[0]
    return "yes" if lo <= row["bound"] else "NO"


def to_markdown(res: dict) -> str:
    c = res["conditions"]
    lines = [
        f"## {c['model']} on {c['device']} ({c['dtype']}, {c['threads']} threads)", "",
        f"Generated by `{c.get('command', 'python -m experiments.bench')}` (git {c['git'][:10]}"
        f"{'+dirty' if c['git_dirty'] else ''}); torch {c['torch']}, transformers {c['transformers']}, Python "
        f"{c['python']}. Prompts: {c['prompts']}; max_new_tokens {c['max_new_tokens']}; bare forwards: median of "
        f"{c['repeats']}.", "",
        "Speedup vs AR is the ratio of whole-generation times (the prefill included); the decode-only speedup "
        "leaves the prefill, the same forward on both sides, out of both, with its 95% bootstrap interval over the "
        "prompts. The bound is τ · t_call(AR) / t_call(method), from the model-call times inside the loop: the "
        "decode-only speedup a loop with no cost of its own would reach. A loop costs something, so the decode-only "
        "speedup stays at or below the bound up to the noise of its interval (column ≤ bound: the interval's lower "
        "end is at or below the bound). Loop overhead = step / model call − 1. t(1) and t(bc) are bare forwards of "
        "1 and bc tokens on the run's mean cache length, timed after the run.", "",
        "| method | bc | τ | tokens/s | speedup vs AR | decode-only speedup | bound | ≤ bound | step (ms) | "
        "model call (ms) | AR model call (ms) | loop overhead | tokens fed / step | t(1) (ms) | t(bc) (ms) | lossless | "
        "peak mem (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['method']} | {r['bc'] or '—'} | {with_interval(r['tau'], r.get('tau_ci'))} | {r['tokens_per_s']:.1f} | "
            f"{r['speedup']:.3f} | {with_interval(r['decode_speedup'], r.get('decode_speedup_ci'))} | {r['bound']:.3f} | "
            f"{within_bound(r)} | {r['step_ms']:.1f} | {r['model_call_ms']:.1f} | {r.get('ar_model_call_ms', 0):.1f} | "
            f"{100 * r['loop_overhead']:+.1f}% | {r['mean_tokens_fed']:.1f} | {r['fwd_1_ms']:.1f} | {r['fwd_bc_ms']:.1f} | "
            f"{r['lossless']} | {r['peak_mem_mb']:.0f} |")
    if res["load"]:
        lines += ["", "Model load: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in res["load"].items())]
    by = {(r["method"], r["bc"]): r for r in res["runs"]}
    pairs = [(bc, by[("esp", bc)], by[("esp_naive", bc)]) for (m, bc) in by if m == "esp" and ("esp_naive", bc) in by]
    if pairs:
        lines += ["", "ESP efficient (layout built once) vs naive (rebuilt every step), same run: "
                  + "; ".join(f"bc {bc}: step {n['step_ms']:.1f} → {e['step_ms']:.1f} ms (naive/efficient "
                              f"{n['step_ms'] / e['step_ms']:.3f}), loop overhead {100 * n['loop_overhead']:+.1f}% → "
                              f"{100 * e['loop_overhead']:+.1f}%" for bc, e, n in pairs)]
    if res.get("study"):
        lines += ["", "### Speed of the model forward", "",
                  "Each variant is timed right after the shipped setting (fp32, sdpa, all threads, inference_mode) on "
                  "the first prompt's cache length; speedup = shipped / variant. Lossless: greedy ESP bc 30 = AR in the "
                  "variant's own numerics (first prompt, up to 32 tokens).", "",
                  "| variant | t(1) ms (shipped) | t(30) ms (shipped) | speedup t(1) | speedup t(30) | set-up + timing (s) | lossless | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["study"]:
            if "weights_mb" in r:
                floor = r
                continue
            lossless = r["lossless_own_numerics"]
            if lossless is None:
                lossless = "—"
            elif lossless is not True:  # a divergence, shown with the variant's top-2 logit gap there
                lossless = f"{lossless['class']}: token {lossless['position']}, top-2 gap {lossless['top2_gap']:.3g}"
            lines.append(f"| {r['variant']} | {r['t1_ms']:.1f} ({r['base_1_ms']:.1f}) | {r['t30_ms']:.1f} ({r['base_30_ms']:.1f}) | "
                         f"{r['speedup_1']:.2f} | {r['speedup_30']:.2f} | {r['setup_and_timing_s']:.1f} | {lossless} | {r['note']} |")
        lines += ["", f"Floor of a 1-token forward: {floor['weights_mb']:.0f} MiB of weights read once at the measured "
                  f"copy bandwidth ({floor['copy_gb_s']:.1f} GB/s) = {floor['t1_ms']:.1f} ms."]
    if res.get("profile"):
        p = res["profile"]
        lines += ["", f"### Where a step's time goes (torch.profiler, {p['method']} bc {p['bc']}, one generation of "
                  f"{p['decode_calls']} decode steps, {p['clock']} self time)", "",
                  "| operator | calls | self (ms) | share |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.1f} | {100 * o['share']:.1f}% |" for o in p["ops"]]
        lines += ["", f"All operators together: {p['total_ms']:.0f} ms of the generation's {p['wall_ms']:.0f} ms wall "
                  "(under the profiler); the rest is Python: the model's modules, the loop and the drafter."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("overrides", nargs="*", help="config overrides for every job, e.g. model.device=cuda model.dtype=bfloat16")
    ap.add_argument("--config-dir", action="append", default=[], type=Path,
                    help="an extra config folder (its method/*.yaml join conf/method/), as run.py's --config-dir")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: every method of conf/method/ and esp_naive; names as in method=...")
    ap.add_argument("--bcs", nargs="+", type=int, default=[10, 30, 60])
    ap.add_argument("--per-task", type=int, default=1, help="first N questions of each Spec-Bench task")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats of each bare forward (median)")
    ap.add_argument("--no-load-times", dest="load_times", action="store_false", help="skip the (cold ~40 s) load timing")
    ap.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    ap.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    ap.add_argument("--no-study", dest="study", action="store_false", help="skip the forward speed study")
    ap.add_argument("--compile", action="store_true", help="add torch.compile to the speed study (minutes of compilation)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler breakdown")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    valid = bench_methods(args.config_dir)
    args.methods = args.methods or valid
    unknown = [m for m in args.methods if m not in valid]
    if unknown:
        ap.error(f"unknown method {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    res = run_bench(args)
    header = ("# Benchmarks\n\nEvery number below comes from one run of the command in its section; ratios are "
              "measured within that run. On a shared CPU absolute times are noisy: read the ratios.\n\n")
    json_path = args.json or args.out.with_suffix(".json")
    write_atomic(json_path, json.dumps(res, indent=2))
    write_atomic(args.out, header + to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
