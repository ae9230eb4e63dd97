"""Drafting parts shared by the methods: every method module (ESP+, and the rivals in `baselines/`)
builds its drafts from these instead of its own copy.

- **Context copies** (`copy_matches`): the continuations of earlier occurrences of the text's last n
  tokens, n from long to short — Prompt Lookup Decoding's matcher (Saxena, 2023), also one of ESP+'s
  sources.
- **Tries** (`trie`): several draft sequences under one root merged into one token tree (shared prefixes
  fed once) — PLD's tree mode and Lookahead's verification branch.
- **The successor matrix** (`SUCCESSORS`, `recycle`, `RANK_PRIOR`): Token Recycling's (Luo et al., ACL
  2025) V x 8 table of the tokens the model last predicted after each token, refreshed from every
  forward — Token Recycling's whole draft source, and one of ESP+'s.
- **Rank-path trees** (`bfs_order`, `check_rank_tree`, `rank_tree_parents`, `draft_tree`): a static draft
  tree given as rank paths, (r1, r2, …) = the r2-th candidate under the r1-th candidate of the root — the
  tree shapes of Token Recycling and STAND, fitted per model by `python -m experiments.fit_trees` into
  `conf/trees/<method>/<model>.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from mtp.errors import ConfigError
from mtp.loop import Step

RankPath = tuple[int, ...]
TREES_DIR = Path(__file__).resolve().parent.parent / "conf" / "trees"  # <method>/<model>.json, fitted trees
FIT_COMMAND = "python -m experiments.fit_trees model={model} --bc 10 30 60 120"


# --------------------------------------------------------------------------- context copies
def copy_matches(tokens: list[int], max_ngram_size: int, length: int, truncated: bool) -> Iterator[list[int]]:
    """Continuations of earlier occurrences of the text's last n tokens, n = max_ngram_size .. 1,
    earliest occurrence first: yields lists of up to `length` tokens.

    `truncated=false` (PLD's reference code): only a whole continuation of `length` tokens that does not
    run into the matched suffix itself; `truncated=true` (transformers' prompt lookup): a continuation cut
    short by the end of the text is taken too."""
    seq = torch.tensor(tokens)
    L = len(tokens)
    for n in range(min(max_ngram_size, L - 1), 0, -1):
        hits = (seq.unfold(0, n, 1) == seq[-n:]).all(dim=1).nonzero().flatten().tolist()
        for i in hits:
            start, end = i + n, i + n + length
            if truncated:
                end = min(end, L)
            elif end > L or start >= L - n:
                continue
            if start < end:
                yield tokens[start:end]


# --------------------------------------------------------------------------- tries
def trie(root: int, drafts: Iterable[Iterable[int]], max_rows: int | None = None) -> tuple[list[int], list[int]]:
    """Token tree rows (ids, parents) of `drafts`, each a chain under `root`, merged on shared prefixes
    (in the order given). With `max_rows`, the tree stops growing when it has that many rows (root
    included)."""
    ids, parents, child = [root], [-1], {}  # child[(row, token)] -> row
    for draft in drafts:
        row = 0
        for t in draft:
            if (row, t) not in child:
                if max_rows is not None and len(ids) >= max_rows:
                    return ids, parents
                child[(row, t)] = len(ids)
                ids.append(t)
                parents.append(row)
            row = child[(row, t)]
    return ids, parents


# --------------------------------------------------------------------------- the successor matrix
SUCCESSORS = 8  # candidates kept per token
RANK_PRIOR = [0.60, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01]  # rough P(rank r is the accepted child)


def new_successor_matrix(vocab_size: int, device) -> torch.Tensor:
    return torch.zeros(vocab_size, SUCCESSORS, dtype=torch.long, device=device)


def recycle(adj: torch.Tensor, step: Step) -> None:
    """adj[token_i] = top-k of tree row i's logits (k = adj's width), for every tree row of the block; on
    duplicate tokens the accepted-path row wins, then the later row in BFS order."""
    ids = step.block.ids[: step.block.n_tree]
    on_path = set(step.path)
    order = [i for i in range(len(ids)) if i not in on_path] + list(step.path)
    last = {t: i for i, t in zip(order, ids[order].tolist())}  # later in `order` overwrites
    rows = torch.tensor(list(last.values()), device=adj.device)
    adj[ids[rows].to(adj.device)] = torch.topk(step.logits[rows], adj.shape[1], dim=-1).indices


# --------------------------------------------------------------------------- rank-path trees
def bfs_order(paths: Iterable[Iterable[int]]) -> list[RankPath]:
    """Distinct rank paths by depth, then lexicographically (a parent always before its children)."""
    return sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))


def check_rank_tree(paths: list[RankPath], what: str) -> None:
    """Rank paths must be non-empty, non-negative and prefix-closed (every node's parent is in the tree)."""
    have = set(paths)
    for p in paths:
        if not p or min(p) < 0:
            raise ConfigError(f"{what} tree node {list(p)} is not a rank path (non-empty, ranks >= 0)")
        if len(p) > 1 and p[:-1] not in have:
            raise ConfigError(f"{what} tree is not prefix-closed: {list(p)} has no parent {list(p[:-1])}")


def rank_tree_parents(paths: list[RankPath]) -> list[int]:
    """Parent rows of the tree [root] + paths (root = row 0, path i = row i + 1)."""
    row = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    return [-1] + [row[p[:-1]] for p in paths]


def load_fitted(path: Path, bc: int) -> list[RankPath] | None:
    """bc - 1 rank paths from a fitted-tree file: `trees[bc]` if present, else the first bc - 1 of its
    `ranking` (nested and prefix-closed), or None when it has neither."""
    data = json.loads(Path(path).read_text())
    if str(bc) in data.get("trees", {}):
        return [tuple(p) for p in data["trees"][str(bc)]]
    ranking = [tuple(p) for p in data.get("ranking", [])]
    return ranking[: bc - 1] if ranking else None


def fitted_file(method: str, model_name: str | None) -> Path | None:
    """conf/trees/<method>/<model>.json when it exists."""
    path = TREES_DIR / method / f"{model_name}.json"
    return path if model_name and path.is_file() else None


_warned: set[tuple[str, str | None]] = set()


def draft_tree(method: str, tree, bc: int, model_name: str | None, rule: Callable[[int], list[RankPath]]):
    """The rank paths a tree-shaped method drafts with at `bc`, and where they come from (`source`):
    `tree` = auto (the fitted tree of `model_name` when there is one, else the method's rule tree, with a
    warning once per process naming the fit command) | rule | a fitted-tree JSON file | a list of rank paths."""
    if isinstance(tree, (list, tuple)):
        return [tuple(p) for p in tree], "given"
    if tree == "rule":
        return rule(bc), "rule"
    if tree == "auto":
        path = fitted_file(method, model_name)
        paths = load_fitted(path, bc) if path is not None else None
        if paths:
            return paths, f"fitted:{path.relative_to(TREES_DIR.parent.parent)}"
        if (method, model_name) not in _warned:
            _warned.add((method, model_name))
            print(f"[mtp] warning: no fitted {method} tree for model {model_name} (conf/trees/{method}/{model_name}.json); "
                  f"drafting with the rule tree, which tables mark 'rule tree (unfitted)'. Fit one on the calib "
                  f"prompts: {FIT_COMMAND.format(model=model_name)}", file=sys.stderr)
        return rule(bc), "rule"
    path = Path(tree)
    if not path.is_file():
        raise ConfigError(f"method.tree={tree!r}: expected auto | rule | a fitted-tree JSON file")
    paths = load_fitted(path, bc)
    if not paths:
        raise ConfigError(f"{path}: no tree for bc={bc} and no ranking")
    return paths, f"fitted:{path}"
