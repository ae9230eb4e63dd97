"""Fit the static draft trees of the tree-shaped rivals (Token Recycling, STAND) to block complexities,
offline, on the calib split only.

    python -m experiments.fit_trees model=smollm2_135m --bc 10 30 60 120
    python -m experiments.fit_trees model=llama3_8b --bc 10 30 60 120     # on a GPU, before experiment=table1
    python -m experiments.fit_trees model=tiny_llama --methods stand --bc 10 --prompts my.jsonl --out-dir /tmp/t

Hydra overrides (`model=…`, `model.device=cuda`, `method.persist=true` for STAND, …) are composed as a job's
would be; the flags are listed by `--help`.

Prompts: the calib split (`mtp.data`: the last 2 questions of each category) of Spec-Bench, or of the file
given with `--prompts`, first turns, greedy; `--limit` keeps the first N. Evaluation reads the eval split,
so no fitted tree has seen an evaluated prompt; `task.split=eval` (or `all`) is refused.

Procedure, for each method: draft with a large tree over the calib prompts, count how often each of its
nodes lies on the accepted path (its empirical reach), and rank the nodes: repeatedly take the node of
highest count among those whose parent is already ranked (STAND: and whose next-lower sibling rank is, so
that every tree is gap-free in rank); ties go to the large tree's own order. The ranking is nested, and
the tree for a bc is its first bc - 1 nodes (prefix-closed by construction).
- `recycling`: the large tree is the published 80-node template widened to `--recycling-nodes` (160) by the
  rank paths of highest prior score (`baselines.recycling.fitting_template`), run in the decode loop over
  the calib prompts with one successor matrix kept across them, as in a job (the matrix depends on every
  row of every block, so the steps cannot be replayed).
- `stand`: the large tree is STAND's rule tree of `--stand-nodes` (625) rank paths, depth <= 8.
  `--stand-mode replay` (default): the greedy output is generated once with plain AR, recording the
  verified path's logits; then every generated position is taken as a step root in turn: draft the big tree
  from the store as it stood then, walk it along the true greedy continuation (the verifier's own walk),
  count, and add the position's observation. At T = 0 the store depends only on the committed text, so this
  equals running the big tree, with one step per position (more data) and no 626-token forwards.
  `--stand-mode loop` runs the big tree in the decode loop instead.

Output: `conf/trees/<method>/<model>.json` (`--out-dir` for elsewhere) with a `header` (command, model,
prompts: file, split, question ids; date, environment), `est_tau` (1 + mean accepted drafts per step within
each tree: the fit's estimate of τ), `trees` for each `--bc`, the `ranking` and its `counts`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from baselines.recycling import TokenRecycling, fitting_template
from baselines.stand import RULE_PRIOR, Stand, rule_tree
from mtp.cli import compose
from mtp.data import REPO_ROOT, load_questions
from mtp.drafting import TREES_DIR, RankPath, bfs_order
from mtp.errors import ConfigError
from mtp.loop import Decoder, Drafter, Step, walk
from mtp.models import chat_ids, load_model, stop_ids
from mtp.runner import environment

METHODS = ("recycling", "stand")


# --------------------------------------------------------------------------- ranking
def rank_nodes(paths: list[RankPath], counts: dict, gap_free: bool) -> list[RankPath]:
    """All `paths`, ranked: repeatedly the node of highest count among those whose parent is ranked
    (gap_free: and whose rank - 1 sibling is); ties: the order of `paths`. Every prefix is a tree."""
    order = {p: i for i, p in enumerate(paths)}
    have, ranked, done = set(paths), [], set()
    kids = defaultdict(list)
    for p in paths:
        kids[p[:-1]].append(p)

    def ready(p):
        return (len(p) == 1 or p[:-1] in done) and (not gap_free or p[-1] == 0 or p[:-1] + (p[-1] - 1,) in done)

    heap = [(-counts.get(p, 0), order[p], p) for p in paths if ready(p)]
    heapq.heapify(heap)
    queued = {p for _, _, p in heap}
    while heap:
        _, _, p = heapq.heappop(heap)
        ranked.append(p)
        done.add(p)
        for c in kids[p] + [p[:-1] + (p[-1] + 1,)]:  # its children, and its next sibling
            if c in have and c not in queued and ready(c):
                heapq.heappush(heap, (-counts.get(c, 0), order[c], c))
                queued.add(c)
    return ranked


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


# --------------------------------------------------------------------------- counting
class _CountingRecycling(TokenRecycling):
    """Token Recycling that counts, per rank path, how often its node was on the accepted path."""

    def observe(self, step: Step) -> None:
        for row in step.path[1:]:
            self.counts[self.paths[row - 1]] += 1
        self.steps += 1
        super().observe(step)


class _CountingStand(Stand):
    """STAND that counts, per rank path, how often its node was on the accepted path (loop mode)."""

    def observe(self, step: Step) -> None:
        for row in step.path[1:]:
            self.counts[self.row_paths[row]] += 1
        self.steps += 1
        super().observe(step)


class _Recorder(Drafter):
    """AR, recording the store's view of every observed root row: (top ids, top probs)."""

    def __init__(self, stand: Stand):
        self.stand, self.rows = stand, []

    def observe(self, step: Step) -> None:
        ids, probs = self.stand.top_dist(step.logits[:1])
        self.rows.append((ids[0], probs[0]))


def count_recycling(decoder, prompts, args, cfg) -> tuple[list[RankPath], dict, int, int]:
    big = fitting_template(args.recycling_nodes)
    d = _CountingRecycling(bc=len(big) + 1, tree=big)
    d.counts, d.steps = defaultdict(int), 0
    d.setup(decoder.model)
    n_tokens = 0
    for ids in tqdm(prompts, desc="fit Token Recycling tree (loop)", unit="prompt", file=sys.stderr):
        n_tokens += len(decoder.generate(d, ids, args.max_new_tokens).new_ids)
    return big, d.counts, d.steps, n_tokens


def count_stand(decoder, prompts, args, cfg) -> tuple[list[RankPath], dict, int, int]:
    params = OmegaConf.to_container(cfg.method, resolve=True)
    for key in ("name", "_target_", "bc", "tree", "temperature", "gumbel", "model_name"):
        params.pop(key, None)
    big = rule_tree(args.stand_nodes, RULE_PRIOR[: params.get("top_n", 10)], max_depth=8)
    cls = _CountingStand if args.stand_mode == "loop" else Stand
    stand = cls(bc=len(big) + 1, tree=big, temperature=0.0, gumbel=False, **params)
    stand.counts, stand.steps = defaultdict(int), 0
    stand.setup(decoder.model)
    n_tokens = 0
    for ids in tqdm(prompts, desc=f"fit STAND tree ({args.stand_mode})", unit="prompt", file=sys.stderr):
        if args.stand_mode == "loop":
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
            for node in walk_continuation(d_ids, d_parents, new[t + 1 :])[1:]:
                stand.counts[d_rows[node]] += 1
            stand.steps += 1
            stand.add(hist, top_ids, top_p)
            seq.append(new[t + 1])
    return big, stand.counts, stand.steps, n_tokens


COUNTERS = {"recycling": count_recycling, "stand": count_stand}


# --------------------------------------------------------------------------- the command
def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m experiments.fit_trees", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model=smollm2_135m model.device=cuda")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--bc", type=int, nargs="+", default=[10, 30, 60, 120], help="block complexities to fit")
    ap.add_argument("--prompts", default=None, help="Spec-Bench-format JSONL (default: Spec-Bench); its calib split is read")
    ap.add_argument("--limit", type=int, default=None, help="at most this many calib prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--recycling-nodes", type=int, default=160, help="size of Token Recycling's large template")
    ap.add_argument("--stand-nodes", type=int, default=625, help="size of STAND's large rule tree")
    ap.add_argument("--stand-mode", choices=("replay", "loop"), default="replay")
    ap.add_argument("--out-dir", default=None, help="default: conf/trees (files <method>/<model>.json)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    split = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0].lstrip("+") == "task.split"]
    if split and split[-1] != "calib":
        raise ConfigError(f"task.split={split[-1]}: trees are fitted on the calib split only (evaluation reads eval)")
    if min(args.bc) < 2:
        raise ConfigError(f"--bc {min(args.bc)}: a draft tree needs bc >= 2")
    for method, nodes in (("recycling", args.recycling_nodes), ("stand", args.stand_nodes)):
        if method in args.methods and nodes < max(args.bc) - 1:
            raise ConfigError(f"--{method}-nodes {nodes} is smaller than the largest tree asked for ({max(args.bc) - 1} nodes)")
    task = ["task=spec_bench", "task.split=calib"] + ([f"task.path={Path(args.prompts).resolve()}"] if args.prompts else [])
    cfg = compose(["method=stand", *task, *[o for o in args.overrides if not o.startswith("task.split")]])
    questions = load_questions(cfg.task)[: args.limit]
    model, tok = load_model(cfg.model)
    decoder = Decoder(model, stop_ids(model, tok), 0.0, cfg.seed)
    prompts = [chat_ids(tok, [{"role": "user", "content": q.turns[0]}], cfg.model.get("thinking")) for q in questions]
    env = environment(model)
    out_dir = Path(args.out_dir) if args.out_dir else TREES_DIR
    results = {}
    for method in args.methods:
        t0 = time.perf_counter()
        big, counts, steps, n_tokens = COUNTERS[method](decoder, prompts, args, cfg)
        ranking = rank_nodes(big, counts, gap_free=method == "stand")
        ranked_counts = [counts.get(p, 0) for p in ranking]
        trees = {str(bc): [list(p) for p in bfs_order(ranking[: bc - 1])] for bc in args.bc}
        est_tau = {str(bc): round(1 + sum(ranked_counts[: bc - 1]) / max(steps, 1), 4) for bc in args.bc}
        header = {
            "made_by": "python -m experiments.fit_trees " + " ".join(shlex.quote(_portable(a) if Path(a).is_absolute()
                                                                              else a) for a in argv),
            "method": method,
            "model": cfg.model.name,
            "prompts": {"file": _portable(args.prompts), "split": "calib", "turns": "first",
                        "question_ids": [q.question_id for q in questions]},
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "large_tree": {"nodes": len(big), "max_depth": max(len(p) for p in big)},
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.0,
            "steps": steps,
            "new_tokens": n_tokens,
            "runtime_s": round(time.perf_counter() - t0, 1),
            "environment": env,
        } | ({"stand_mode": args.stand_mode} if method == "stand" else {})
        out = out_dir / method / f"{cfg.model.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_dump({"header": header, "est_tau": est_tau, "trees": trees,
                              "ranking": [list(p) for p in ranking], "counts": ranked_counts}))
        print(f"[fit_trees] {method} on {cfg.model.name}: {len(questions)} calib prompts, {n_tokens} tokens, {steps} "
              f"steps, est. tau {est_tau}, {header['runtime_s']:.0f} s -> {out}", file=sys.stderr)
        results[method] = {"out": out, "header": header, "trees": trees, "ranking": ranking,
                           "counts": ranked_counts, "est_tau": est_tau}
    return results


def _portable(path) -> str:
    """The prompt file as the project knows it: the Spec-Bench file beside the repository, or the file's
    name, never a machine's absolute path."""
    if path is None:
        return "spec_bench (../shared/data/spec_bench/question.jsonl)"
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else path.name


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
