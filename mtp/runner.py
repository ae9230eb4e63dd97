"""One job: a model, a method at a block complexity, a prompt set. AR and the method run on the same
prompt turns in the same process, interleaved per turn, so speedup is a side-by-side ratio and every
job checks losslessness. Writes `records.jsonl` (one row per turn, flushed as it goes) and
`summary.json` into the job's output directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mtp.data import REPO_ROOT, DataError, load_questions, split_of, warmup_question
from mtp.errors import ConfigError
from mtp.loop import Decoder, Drafter, Generation
from mtp.lossless import classify, lossless_label
from mtp.metrics import first_mismatch, summarize
from mtp.models import chat_ids, load_model, stop_ids


def validate(cfg) -> None:
    """Checks that need no model, run before anything is loaded."""
    for key in ("bc", "max_new_tokens", "repeats"):
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{key}={v!r} must be an integer (e.g. {key}=30)")
    if cfg.bc < 1:
        raise ConfigError(f"bc={cfg.bc}: the block complexity (tokens per forward) must be >= 1")
    if cfg.repeats < 1:
        raise ConfigError(f"repeats={cfg.repeats} must be >= 1 (1 = time each turn once)")
    if cfg.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} must be > 0")
    if not isinstance(cfg.temperature, (int, float)) or cfg.temperature < 0:
        raise ConfigError(f"temperature={cfg.temperature!r} must be a number >= 0 (0 = greedy)")


def build_drafter(cfg) -> Drafter:
    """The method's drafter from `cfg.method` (`_target_` = class, other keys = its arguments)."""
    from hydra.utils import get_class

    params = OmegaConf.to_container(cfg.method, resolve=True)
    params.pop("name", None)
    cls = get_class(params.pop("_target_"))
    drafter = cls(**params)
    if cfg.bc < drafter.min_bc:
        raise ConfigError(f"bc={cfg.bc} is below method {cfg.method.name}'s minimum block complexity {drafter.min_bc}")
    return drafter


def git_state() -> dict:
    """The repository's commit and whether the working tree has uncommitted changes."""
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        git, dirty = "", False
    return {"git": git or "unknown", "git_dirty": dirty}


def environment(model) -> dict:
    """Where a result was measured: code version, library versions, device, threads, dtype."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            cpu = [line for line in open("/proc/cpuinfo") if line.startswith("model name")]
            device_name = cpu[0].split(":", 1)[1].strip() if cpu else device_name
        except OSError:
            pass
    import transformers

    return git_state() | {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(dev),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def first_difference(model, prompt_ids: list[int], ids: list[int], ar_ids: list[int]) -> dict | None:
    """First position where a method's output leaves AR's (a length difference counts), with the
    top-2 logit gap of the model at that position (a near-tie shows as a tiny gap) and the divergence's
    class in the model's dtype (`mtp.lossless.classify`: a numeric tie or a defect)."""
    pos = first_mismatch(ids, ar_ids)
    if pos is None:
        return None
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + ar_ids[:pos]], device=device)).logits[0, -1].float()
    top2 = torch.topk(logits, 2)
    diff = {
        "position": pos,
        "method_token": ids[pos] if pos < len(ids) else None,
        "ar_token": ar_ids[pos] if pos < len(ar_ids) else None,
        "top2_tokens": top2.indices.tolist(),
        "top2_gap": float(top2.values[0] - top2.values[1]),
    }
    return diff | {"class": classify(diff, str(next(model.parameters()).dtype).removeprefix("torch."))}


def _gen_fields(g: Generation, prefix: str = "") -> dict:
    return {
        f"{prefix}ids": g.new_ids,
        f"{prefix}new_tokens": len(g.new_ids),
        f"{prefix}stop": g.stop,
        f"{prefix}decode_calls": g.decode_calls,
        f"{prefix}prefill_calls": g.prefill_calls,
        f"{prefix}decode_committed": sum(g.committed_per_step),
        f"{prefix}tokens_fed_max": g.tokens_fed_max,
        f"{prefix}tokens_fed_mean": g.tokens_fed_mean,
        f"{prefix}accept_hist": g.accept_hist,
        f"{prefix}accepted_hist": g.accepted_hist,
        f"{prefix}leaf_hist": g.leaf_hist,
        f"{prefix}wall_s": g.wall_s,
        f"{prefix}prefill_s": g.prefill_s,
        f"{prefix}forward_s": g.forward_s,
    }


# what a job's records do not depend on: where W&B logs, and a resume override
NOT_IN_FINGERPRINT = ("wandb", "force")
# what AR's output does not depend on: a method's own settings and the job's comparison switches
NOT_IN_AR_OUTPUT = NOT_IN_FINGERPRINT + ("method", "bc", "compare_ar", "warmup", "warmup_tokens", "compared_methods")


def fingerprint(cfg, without: tuple[str, ...] = NOT_IN_FINGERPRINT) -> str:
    """The run's identity: a hash of everything in the job's config that can change its records. Written
    into job.json and summary.json; resume, the tables (which runs are the same) and the audit (which AR job
    a method's output is compared with: `without=NOT_IN_AR_OUTPUT`) all use it."""
    conf = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    conf = {k: ({kk: vv for kk, vv in v.items() if kk != "cache_dir"} if isinstance(v, dict) else v)
            for k, v in conf.items() if k not in without and k != "cache_dir"}  # where caches live changes nothing
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_choices() -> dict:
    """The config group choices of the running Hydra job (model, method, task, arm, experiment), {} when
    the job was composed outside Hydra's app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_records(path: Path) -> tuple[list[dict], str | None]:
    """The records of a `records.jsonl` up to a torn last line (a killed write), and the file's text
    without that tail when there was one to drop (None when the file is whole)."""
    text = path.read_text() if path.exists() else ""
    records, kept = [], []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        kept.append(line + "\n")
    clean = "".join(kept)
    return records, None if clean == text else clean


def finished_turns(out_dir: Path, cfg) -> dict[tuple[str, int], dict]:
    """Records already in `out_dir` from an earlier run of the same job, keyed by (question id, turn).
    A different job's records there are an error; a torn last line (a killed write) is dropped."""
    job, path = out_dir / "job.json", out_dir / "records.jsonl"
    fp, git = fingerprint(cfg), git_state()
    if job.exists():
        recorded = json.loads(job.read_text())
        if recorded["fingerprint"] != fp:
            raise ConfigError(f"{out_dir} holds records of a different job configuration; "
                              "choose another output dir (hydra.run.dir=...) or delete that one")
        then = recorded.get("git", {}).get("git")
        if then and then != git["git"] and not cfg.get("force"):
            raise ConfigError(f"{out_dir} holds records made by the code at git {then[:10]}; the code is now at "
                              f"{git['git'][:10]}, so its records may differ. Run into another folder "
                              f"(hydra.run.dir=...), delete that one, or pass +force=true to keep the recorded turns")
    else:
        write_atomic(job, json.dumps({"fingerprint": fp, "git": git, "config": OmegaConf.to_container(cfg, resolve=True)},
                                     indent=2))
    records, without_tail = read_records(path)
    if without_tail is not None:  # drop a torn tail; new turns are appended after the rest
        write_atomic(path, without_tail)
    return {(str(rec["question_id"]), rec["turn"]): rec for rec in records}


def run_job(cfg, out_dir: Path) -> dict:
    """Run the job described by `cfg` into `out_dir`; returns the summary (also written to disk).
    Re-running it into the same directory keeps the turns already recorded and runs only the rest."""
    validate(cfg)
    questions = load_questions(cfg.task)
    drafter = build_drafter(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = finished_turns(out_dir, cfg)
    n_turns = sum(len(q.turns) for q in questions)
    summary_file = out_dir / "summary.json"
    if summary_file.exists() and all((str(q.question_id), t) in done for q in questions for t in range(len(q.turns))):
        print(f"[mtp] {out_dir}: all {n_turns} turns already recorded; job skipped", file=sys.stderr)
        return json.loads(summary_file.read_text())
    model, tok = load_model(cfg.model)
    decoder = Decoder(model, stop_ids(model, tok), cfg.temperature, cfg.seed)
    ar = Drafter()
    thinking = cfg.model.get("thinking")

    def prompt(messages):
        return chat_ids(tok, messages, thinking)

    def answer(ids):
        return {"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}

    for q in questions:  # fail before generating anything if a first turn cannot fit in the context
        check_fits(decoder, cfg.model.name, q.question_id, 0, prompt([{"role": "user", "content": q.turns[0]}]))
    drafter.setup(model)
    if cfg.warmup:
        warm_q = warmup_question(cfg.task)
        warm = prompt([{"role": "user", "content": warm_q.turns[0]}])
        check_fits(decoder, cfg.model.name, warm_q.question_id, 0, warm)
        warm_up(decoder, [ar, drafter], warm, cfg.warmup_tokens)

    records, committed, calls, lossless = [], 0, 0, True  # running totals for the progress bar
    bar = tqdm(total=n_turns, desc=f"{cfg.model.name} {cfg.method.name} bc={cfg.bc}", unit="turn", file=sys.stderr)
    with open(out_dir / "records.jsonl", "a") as f:  # appended: a kill never loses a finished turn
        for q in questions:
            history, ar_history = [], []  # each decoder continues its own conversation
            for turn, text in enumerate(q.turns):
                history.append({"role": "user", "content": text})
                ar_history.append({"role": "user", "content": text})
                rec = done.get((str(q.question_id), turn))
                if rec is None:
                    ids, ar_ids = prompt(history), prompt(ar_history) if cfg.compare_ar else None
                    for x in (ids, ar_ids or []):
                        check_fits(decoder, cfg.model.name, q.question_id, turn, x)
                    rec = run_turn(cfg, model, decoder, drafter, ar, ids, ar_ids)
                    rec = {"question_id": q.question_id, "category": q.category, "task": q.task, "turn": turn} | rec
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                history.append(answer(rec["ids"]))
                if cfg.compare_ar:
                    ar_history.append(answer(rec["ar_ids"]))
                records.append(rec)
                committed += rec["decode_committed"]
                calls += rec["decode_calls"]
                lossless = lossless and rec.get("matches_ar") is not False
                bar.update(1)
                bar.set_postfix(tau=f"{committed / max(calls, 1):.2f}", **({"lossless": int(lossless)} if cfg.compare_ar else {}))
    bar.close()

    summary = summarize(records)
    summary |= {
        "model": cfg.model.name,
        "method": cfg.method.name,
        "task": cfg.task.name,
        "split": split_of(cfg.task),  # eval | calib | all (mtp.data)
        "draft_tree": getattr(drafter, "tree_source", None),  # tree-shaped methods: fitted:<file> | rule | given
        "bc": cfg.bc,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "resumed_turns": len(done),
        "random_weights": bool(cfg.model.get("random_weights")),  # a shape model: τ and lossless mean nothing
        "choices": config_choices(),
        "fingerprint": fingerprint(cfg),
        "environment": environment(model),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_atomic(summary_file, json.dumps(summary, indent=2))
    return summary


def warm_up(decoder: Decoder, drafters: list[Drafter], prompt_ids: list[int], max_new_tokens: int) -> None:
    """The warm-up rule, the same for every method: after `setup`, one generation of each drafter on a calib
    prompt (`warmup_question`), excluded from timing and records, long enough for every method to reach its
    steady block shape (Lookahead's window fills in N - 2 <= 4 steps). Job-level state the drafter built
    (Token Recycling's and ESP+'s successor matrices, STAND's store with persist=true) is kept: the job
    goes on from it, as the references keep such state across prompts. Never an eval prompt, so nothing
    of the evaluation is seen before it is evaluated."""
    for drafter in drafters:
        decoder.generate(drafter, prompt_ids, max_new_tokens)


def check_fits(decoder: Decoder, model: str, question_id, turn: int, ids: list[int]) -> None:
    """A prompt longer than the model's context is refused, saying by how much."""
    if len(ids) > decoder.max_positions:
        over = len(ids) - decoder.max_positions
        raise DataError(f"question {question_id} turn {turn}: the prompt is {len(ids)} tokens, {over} more than "
                        f"{model}'s context of {decoder.max_positions} positions; leave it out (task.limit, "
                        f"task.categories) or use a model with a longer context")


def fork(drafter: Drafter, model) -> Drafter:
    """A copy of `drafter` whose state can change without touching the original's; what it holds of the
    model (modules, parameters, tensors sharing their storage, such as ESP's embedding table) is shared."""
    memo = {id(m): m for m in model.modules()} | {id(p): p for p in model.parameters()}
    weights = {p.data_ptr() for p in model.parameters()}

    def share(obj, depth=0):
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor) and v.data_ptr() in weights:
                memo[id(v)] = v
            elif depth < 2 and hasattr(v, "__dict__") and not isinstance(v, torch.nn.Module):
                share(v, depth + 1)

    share(drafter)
    return copy.deepcopy(drafter, memo)


def run_turn(cfg, model, decoder, drafter, ar, ids, ar_ids) -> dict:
    """One prompt turn: AR (when `ar_ids` is given), then the method; their counters and comparison.
    With `repeats` > 1 (and an AR twin), the pair is timed again repeats - 1 times, interleaved, the method
    from a copy of its state before the turn (so the job's state and records are those of one run); the
    wall times of every repeat go into `wall_s_repeats` / `ar_wall_s_repeats`."""
    rec = {"prompt_tokens": len(ids), "method": cfg.method.name, "bc": cfg.bc}
    repeats = int(cfg.get("repeats", 1) or 1) if ar_ids is not None else 1
    forks = [fork(drafter, model) for _ in range(repeats - 1)]
    if ar_ids is not None:
        g_ar = decoder.generate(ar, ar_ids, cfg.max_new_tokens)
    g = decoder.generate(drafter, ids, cfg.max_new_tokens)
    rec |= _gen_fields(g)
    if forks:
        walls, ar_walls = [g.wall_s], [g_ar.wall_s]
        for copy_of_drafter in forks:
            ar_walls.append(decoder.generate(ar, ar_ids, cfg.max_new_tokens).wall_s)
            walls.append(decoder.generate(copy_of_drafter, ids, cfg.max_new_tokens).wall_s)
        rec |= {"wall_s_repeats": walls, "ar_wall_s_repeats": ar_walls}
    if ar_ids is not None:
        rec |= _gen_fields(g_ar, "ar_")
        if cfg.temperature > 0 and drafter.random_drafts:  # ids differ from AR's by design (Drafter.random_drafts)
            rec |= {"lossless_check": "distribution", "matches_ar": None, "first_diff": None}
            return rec
        if ids != ar_ids:
            diff = {"position": None, "reason": "prompt differs (an earlier turn diverged)", "class": "after_divergence"}
        else:
            diff = first_difference(model, ids, g.new_ids, g_ar.new_ids)
        rec["matches_ar"] = diff is None
        rec["first_diff"] = diff
    return rec


def format_summary(s: dict, out_dir: Path) -> str:
    ci = s.get("ci") or {}

    def f(v, spec=".3f", key=None):
        """A number, with its 95% interval when the summary has one."""
        if v is None:
            return "n/a"
        lo_hi = ci.get(key) if key else None
        return format(v, spec) + (f" [{format(lo_hi[0], spec)}, {format(lo_hi[1], spec)}]" if lo_hi else "")

    speed = [f"  speedup vs AR         {f(s['speedup'], key='speedup')}"
             + ("" if s["compared_with_ar"] else "  (compare_ar=false: not measured side by side)")]
    if s.get("speedup_repeats"):
        r = s["speedup_repeats"]
        speed += [f"  speedup, {r['n']} repeats  median {r['median']:.3f}, min {r['min']:.3f}, max {r['max']:.3f}   (every "
                  f"repeat times AR and the method again, interleaved)"]
    if s.get("decode_speedup") is not None:
        speed += [f"  decode-only speedup   {f(s['decode_speedup'], key='decode_speedup')}   (prefill left out of both sides; "
                  f"Spec-Bench's mean-throughput ratio {f(s.get('speedup_specbench'))})"]
    if s.get("bound") is not None:
        speed += [f"  bound                 {f(s['bound'])}   (τ · t(1) / t(block) from this job's model calls: the decode-only "
                  f"speedup of a loop that costs nothing)",
                  f"  what limits speed     a forward of this method's blocks ({f(s['mean_tokens_per_forward'], '.1f')} tokens on "
                  f"average) costs {f(s['forward_cost'], '.2f')} one-token forwards here, so τ {f(s['tau'], '.2f')} buys at "
                  f"most {f(s['bound'], '.2f')}×"]
    lines = [
        f"== {s['model']} · {s['method']} · bc={s['bc']} · {s['task']} ({s['n_prompts']} prompts, {s['n_turns']} turns, "
        f"max_new_tokens={s['max_new_tokens']}, T={s['temperature']}; [95% bootstrap interval over turns])",
        f"  tau (tokens/step)     {f(s['tau'], key='tau')}",
        *speed,
        f"  tokens/s              {f(s['tokens_per_s'], '.1f', 'tokens_per_s')}   (AR {f(s['ar_tokens_per_s'], '.1f')})",
        f"  decode calls          {s['decode_calls']}   (AR {s.get('ar_decode_calls', 'n/a')}, reduction "
        f"{f(s['call_reduction'], key='call_reduction')})",
        f"  tokens per forward    max {s['max_tokens_per_forward']}, mean {f(s['mean_tokens_per_forward'], '.1f')}",
        f"  accepted per step     {s['accept_hist']}",
        "  acceptance by depth   " + ", ".join(f"{d} {r:.2f}" for d, r in enumerate(s.get("acceptance_by_depth", []), 1))
        + "   (P(depth d accepted | depth d - 1 accepted and a draft below it))",
        "  turns ended by        " + ", ".join(f"{k} {v}" for k, v in s.get("stops", {}).items())
        + ("  (context_limit: the model's context filled up before max_new_tokens)"
           if "context_limit" in s.get("stops", {}) else ""),
        f"  lossless              {lossless_label(s)}" + (f"  ({s['n_mismatches']} turns differ; see records.jsonl "
                                                           "first_diff and its class)" if s.get("n_mismatches") else "")
        + ("  (AR's top two logits within the dtype's rounding at every divergence: mtp/lossless.py)"
           if s["lossless"] == "numeric_ties" else "")
        + ("  (random drafts at T > 0: the ids differ from AR's by design; the verifier keeps the target"
           " distribution, tested by chi-square in tests/)" if s["lossless"] == "in distribution" else ""),
        f"  prompts               split {s.get('split')}" + (f"; draft tree {s['draft_tree']}" if s.get("draft_tree") else "")
        + ("  (rule tree (unfitted): python -m experiments.fit_trees fits one)" if s.get("draft_tree") == "rule" else ""),
        "  per task tau          " + ", ".join(f"{k} {f(v, '.2f')}" for k, v in s["per_task_tau"].items()),
        f"  device                {s['environment']['device_name']} ({s['environment']['dtype']}, torch {s['environment']['torch']})",
        f"  output                {out_dir}",
    ]
    if s.get("random_weights"):
        lines.insert(1, "  RANDOM WEIGHTS        model.random_weights=true: the model's shape, not its weights. Its speed per "
                        "forward is real; its τ, acceptance and lossless are not results (the tables leave this job out)")
    return "\n".join(lines)
