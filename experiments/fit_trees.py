"""Fit a tree-shaped method's static draft tree to block complexities, offline, on held-out prompts.
Today the one such method with a fitting procedure is STAND (`baselines/stand.py`).

    python -m experiments.fit_trees model=smollm2_135m --bc 10 30 60
    python -m experiments.fit_trees model=tiny_llama --bc 10 --prompts my.jsonl --out /tmp/t.json

Hydra overrides (`model=…`, `model.device=cuda`, `method.persist=true`, …) are composed with
`method=stand` exactly as a job would; the flags are listed by `--help`.

Procedure (greedy, T = 0): a big tree (`--nodes` 625 rank paths, depth <= `--max-depth` 8, STAND's
fallback rule at that size) is drafted on held-out prompts — by default the LAST
`--per-category` question(s) of each Spec-Bench category, first turn only (the default job and
`task.per_category=N` evaluate the first ones; a full `task=spec_bench` run overlaps them: pass another file
with `--prompts`). Every node's count = how often it lay on the accepted path; the nodes sorted by count
(ties: the big tree's prior order, so a parent always precedes its children: prefix-closed and nested)
form the `ranking`; the tree for bc is its first bc - 1 nodes.

Modes:
- `replay` (default): the greedy output is generated once with plain AR through the decode loop, recording
  the verified path's logits; then every generated position is taken as a step root in turn: draft the big
  tree from the store as it stood then, walk it along the true greedy continuation, count, and add the
  position's observation. At T = 0 the store depends only on the committed text (each committed position
  is observed once, whatever the tree), so this equals running the big tree, with one step per position
  (more data) and no 626-token forwards.
- `loop`: runs the big tree in the decode loop and counts the accepted rows of each observed step (the
  loop does not report its last step to drafters: one step per generation is missed).

Output: JSON with a `header` (command, model, prompts, date, …), `ranking` + `counts`, `trees` for each
`--bc`, and `est_tau` (1 + mean accepted drafts per position within each tree, replay's estimate of τ).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from baselines.stand import RULE_PRIOR, TREES_DIR, Stand, bfs_order, rule_tree
from mtp.cli import compose
from mtp.data import REPO_ROOT, read_questions, resolve_path
from mtp.errors import ConfigError
from mtp.loop import Decoder, Drafter, Step, walk
from mtp.models import chat_ids, load_model, stop_ids
from mtp.runner import environment


class _Recorder(Drafter):
    """AR, recording the store's view of every observed root row: (context, top ids, top probs)."""

    def __init__(self, stand: Stand):
        self.stand, self.rows = stand, []

    def observe(self, step: Step) -> None:
        ids, probs = self.stand.top_dist(step.logits[:1])
        self.rows.append((ids[0], probs[0]))


class _Counting(Stand):
    """STAND that counts, per rank path, how often its node was on the accepted path."""

    def observe(self, step: Step) -> None:
        for row in step.path[1:]:
            self.counts[self.row_paths[row]] += 1
        self.steps += 1
        super().observe(step)


def walk_continuation(ids: list[int], parents: list[int], continuation: list[int]) -> list[int]:
    """The rows a greedy verifier accepts in the tree (ids, parents) when the model's greedy output from
    the root on is `continuation`: the loop's own walk, with the continuation's token at each depth."""
    depth = [0] * len(parents)
    for i, p in enumerate(parents[1:], start=1):
        depth[i] = depth[p] + 1

    def choose(node, kids):
        if depth[node] >= len(continuation):
            return None, None
        y = continuation[depth[node]]
        return next((c for c in kids if ids[c] == y), None), y

    return walk(ids, parents, choose)[0]


def held_out(path, per_category: int):
    """The last `per_category` questions of each category, in file order."""
    qs = read_questions(resolve_path(path))
    by_cat = defaultdict(list)
    for q in qs:
        by_cat[q.category].append(q)
    keep = {id(q) for cat in by_cat.values() for q in cat[-per_category:]}
    return [q for q in qs if id(q) in keep]


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m experiments.fit_trees", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model=smollm2_135m method.persist=true")
    ap.add_argument("--bc", type=int, nargs="+", default=[10, 30, 60], help="block complexities to fit")
    ap.add_argument("--prompts", default=None, help="Spec-Bench-format JSONL (default: Spec-Bench)")
    ap.add_argument("--per-category", type=int, default=1, help="held-out questions per category, from the end")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts (after --per-category)")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=625, help="size of the big tree")
    ap.add_argument("--max-depth", type=int, default=8, help="depth cap of the big tree")
    ap.add_argument("--mode", choices=("replay", "loop"), default="replay")
    ap.add_argument("--out", default=None, help="default: conf/method/stand_trees/<model>.json")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    t0 = time.perf_counter()
    if args.nodes < max(args.bc) - 1:
        raise ConfigError(f"--nodes {args.nodes} is smaller than the largest tree asked for ({max(args.bc) - 1} nodes)")
    if min(args.bc) < Stand.min_bc:
        raise ConfigError(f"--bc {min(args.bc)}: STAND needs bc >= {Stand.min_bc}")
    cfg = compose(["method=stand", *args.overrides])
    params = OmegaConf.to_container(cfg.method, resolve=True)
    for key in ("name", "_target_", "bc", "tree", "temperature", "gumbel"):
        params.pop(key, None)
    big = rule_tree(args.nodes, RULE_PRIOR[: params.get("top_n", 10)], max_depth=args.max_depth)
    prior_rank = {p: i for i, p in enumerate(big)}
    cls = _Counting if args.mode == "loop" else Stand
    stand = cls(bc=len(big) + 1, tree=big, temperature=0.0, gumbel=False, **params)
    stand.counts, stand.steps = defaultdict(int), 0

    questions = held_out(args.prompts, args.per_category)[: args.limit]
    model, tok = load_model(cfg.model)
    decoder = Decoder(model, stop_ids(model, tok), 0.0, cfg.seed)
    thinking = cfg.model.get("thinking")
    stand.setup(model)
    n_tokens = 0
    for q in tqdm(questions, desc=f"fit STAND tree ({args.mode})", unit="prompt", file=sys.stderr):
        ids = chat_ids(tok, [{"role": "user", "content": q.turns[0]}], thinking)
        if args.mode == "loop":
            n_tokens += len(decoder.generate(stand, ids, args.max_new_tokens).new_ids)
            continue
        rec = _Recorder(stand)
        new = decoder.generate(rec, ids, args.max_new_tokens).new_ids
        n_tokens += len(new)
        stand.start(ids)
        seq = list(ids) + new[:1]
        for t, (top_ids, top_p) in enumerate(rec.rows):  # rows[t]: next-token distribution after new[t]
            hist = tuple(seq[-stand.max_n :])
            d_ids, d_parents, d_rows, _ = stand.draft(hist)
            path = walk_continuation(d_ids, d_parents, new[t + 1 :])
            for node in path[1:]:
                stand.counts[d_rows[node]] += 1
            stand.steps += 1
            stand.add(hist, top_ids, top_p)
            seq.append(new[t + 1])
    env = environment(model)
    del model

    ranking = sorted(big, key=lambda p: (-stand.counts[p], prior_rank[p]))
    counts = [stand.counts[p] for p in ranking]
    trees = {str(bc): [list(p) for p in bfs_order(ranking[: bc - 1])] for bc in args.bc}
    steps = max(stand.steps, 1)
    est_tau = {str(bc): round(1 + sum(counts[: bc - 1]) / steps, 4) for bc in args.bc}
    runtime = time.perf_counter() - t0
    prompts_file = resolve_path(args.prompts)
    header = {
        "made_by": "python -m experiments.fit_trees " + " ".join(shlex.quote(a) for a in argv),
        "model": cfg.model.name,
        "prompts": {
            "file": _portable(prompts_file),
            "selection": f"last {args.per_category} per category, first turn" + (f", first {args.limit}" if args.limit else ""),
            "question_ids": [q.question_id for q in questions],
        },
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": args.mode,
        "big_tree": {"nodes": len(big), "max_depth": args.max_depth, "rule": "baselines.stand.rule_tree"},
        "max_new_tokens": args.max_new_tokens,
        "temperature": 0.0,
        "method": params,
        "positions" if args.mode == "replay" else "steps": stand.steps,
        "new_tokens": n_tokens,
        "runtime_s": round(runtime, 1),
        "environment": env,
    }
    out = Path(args.out) if args.out else TREES_DIR / f"{cfg.model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_dump({"header": header, "est_tau": est_tau, "trees": trees,
                          "ranking": [list(p) for p in ranking], "counts": counts}))
    print(f"[fit_trees] {cfg.model.name}: {len(questions)} prompts, {n_tokens} tokens, {stand.steps} "
          f"{'positions' if args.mode == 'replay' else 'steps'}, est. tau {est_tau}, {runtime:.0f} s -> {out}")
    return {"out": out, "header": header, "trees": trees, "ranking": ranking, "counts": counts, "est_tau": est_tau}


def _portable(path: Path) -> str:
    """A prompt file's name as the project knows it: relative to the repository (or its parent, where
    shared/ lies), never a machine's absolute path."""
    path = Path(path).resolve()
    for base in (REPO_ROOT, REPO_ROOT.parent):
        if path.is_relative_to(base):
            return str(path.relative_to(base)) if base == REPO_ROOT else "../" + str(path.relative_to(base))
    return path.name


def _dump(data: dict) -> str:
    """JSON with one rank path per item, lists of numbers kept on one line."""
    def enc(v, ind):
        pad = " " * ind
        if isinstance(v, dict):
            items = [f'{pad}  {json.dumps(k)}: {enc(x, ind + 2)}' for k, x in v.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
        if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
            return "[" + ", ".join(json.dumps(x, separators=(",", ":")) for x in v) + "]"
        return json.dumps(v, separators=(", ", ": ")) if isinstance(v, list) else json.dumps(v)
    return enc(data, 0) + "\n"


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
