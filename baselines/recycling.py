"""Token Recycling (Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language
Models with Token Recycling", ACL 2025).

An adjacency matrix `adj` (V x 8 token ids, `mtp.drafting`'s successor matrix) holds, for every token,
the top-8 tokens the model last predicted after it. Each step drafts a static tree of rank paths from it
by gathers, depth by depth: node (r1, r2, …) = adj[adj[root, r1], r2]…; after each forward every block
row's top-8 overwrites its token's row (`mtp.drafting.recycle`). The matrix persists across the prompts
of a job (hot start) unless `reset_per_prompt`.

Trees (`tree`): `auto` (default) = the tree fitted for the model by `python -m experiments.fit_trees`
(conf/trees/recycling/<model>.json), the paper's own recipe for a budget it gives no tree for: run a large
template (the published 80-node tree widened by `fitting_template`) on the calib prompts, count how often
each node lies on the accepted path, keep the bc - 1 nodes of highest count (prefix-closed). Without a
fitted file (a warning names the fit command), and with `tree=rule`, the rule trees: the published
80-draft template at bc >= 81; small hand-made trees in the template's image at bc 10 and 30 (a rank-0
spine with the first ranks widest; not calibrated); for any other bc the template's bc - 1 nodes of
highest prior score Π_d RANK_PRIOR[r_d] (a parent always outscores its child: prefix-closed).
"""

from __future__ import annotations

import torch

from mtp.drafting import (RANK_PRIOR, SUCCESSORS, bfs_order, check_rank_tree, draft_tree, new_successor_matrix,
                          rank_tree_parents, recycle)
from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Step, tree_layout


def _expand(spec: str) -> list[tuple[int, ...]]:
    """'[0,0..3] [1,0]' -> [(0,0), (0,1), (0,2), (0,3), (1,0)]."""
    out = []
    for item in spec.split():
        parts = item.strip("[]").split(",")
        last = parts[-1]
        lo, hi = (int(x) for x in last.split("..")) if ".." in last else (int(last), int(last))
        out += [tuple(int(p) for p in parts[:-1]) + (r,) for r in range(lo, hi + 1)]
    return out


TEMPLATE_80 = _expand(
    "[0..7] "
    "[0,0..7] [1,0..3] [2,0..2] [3,0] [3,1] [4,0] [5,0] [6,0] [7,0] "
    "[0,0,0..7] [0,1,0..2] [0,2,0] [0,2,1] [0,3,0] [0,4,0] [0,5,0] [0,6,0] [0,7,0] "
    "[1,0,0] [1,0,1] [1,1,0] [2,0,0] [3,0,0] [4,0,0] [5,0,0] "
    "[0,0,0,0..4] [0,0,1,0] [0,0,1,1] [0,0,2,0] [0,0,3,0] [0,0,4,0] [0,1,0,0] [0,2,0,0] "
    "[1,0,0,0] [2,0,0,0] [3,0,0,0] "
    "[0,0,0,0,0..2] [0,0,0,1,0] [0,0,0,2,0] [0,0,1,0,0] [0,1,0,0,0] [1,0,0,0,0] "
    "[0,0,0,0,0,0] [0,0,0,0,0,1] [0,0,0,1,0,0]"
)
FALLBACK = {
    10: _expand("[0] [1] [2] [3] [0,0] [0,1] [1,0] [0,0,0] [0,0,0,0]"),
    30: _expand("[0..7] [0,0..5] [1,0] [2,0] [3,0] [4,0] [5,0] [0,0,0] [0,0,1] [0,0,2] [0,1,0] [0,2,0] "
                "[1,0,0] [2,0,0] [0,0,0,0] [0,0,0,0,0] [0,0,0,0,0,0]"),
}


def prior_score(path) -> float:
    s = 1.0
    for r in path:
        s *= RANK_PRIOR[r]
    return s


def fitting_template(n: int) -> list[tuple[int, ...]]:
    """The large tree the fit runs: the published 80-node template, widened to n nodes by the rank paths of
    highest prior score (best-first from the template's frontier, so the set stays prefix-closed), BFS order."""
    have = set(TEMPLATE_80)
    frontier = {p + (r,) for p in [()] + TEMPLATE_80 for r in range(SUCCESSORS)} - have
    while len(have) < n and frontier:
        best = max(frontier, key=lambda p: (prior_score(p), -len(p), [-r for r in p]))
        have.add(best)
        frontier.remove(best)
        frontier |= {best + (r,) for r in range(SUCCESSORS)} - have
    return bfs_order(have)


def tree_for_bc(bc: int) -> list[tuple[int, ...]]:
    """The rule tree: rank paths of bc - 1 drafts (or the whole template when bc >= 81), in BFS order."""
    if bc in FALLBACK:
        paths = FALLBACK[bc]
    elif bc - 1 >= len(TEMPLATE_80):
        paths = TEMPLATE_80
    else:
        paths = sorted(TEMPLATE_80, key=lambda p: (-prior_score(p), len(p), p))[: bc - 1]
    return bfs_order(paths)


class TokenRecycling(Drafter):
    name = "recycling"
    min_bc = 2

    def __init__(self, bc: int, reset_per_prompt: bool = False, tree="auto", model_name: str | None = None):
        self.reset_per_prompt = reset_per_prompt
        paths, self.tree_source = draft_tree("recycling", tree, bc, model_name, tree_for_bc)
        self.paths = bfs_order(paths)
        check_rank_tree(self.paths, "Token Recycling")
        if len(self.paths) > bc - 1 or max(p[-1] for p in self.paths) >= SUCCESSORS:
            raise ConfigError(f"Token Recycling tree of {len(self.paths)} nodes, ranks < {SUCCESSORS}, must fit bc={bc} "
                              f"(at most bc - 1 = {bc - 1} nodes)")
        self.parents = rank_tree_parents(self.paths)
        self.layout = tree_layout(self.parents, static=True)  # built once, handed out every step
        # per depth: rows filled at that depth (path i is row i + 1), their parents' rows, their ranks
        self.levels = []
        for d in sorted({len(p) for p in self.paths}):
            rows = [i + 1 for i, p in enumerate(self.paths) if len(p) == d]
            self.levels.append((torch.tensor(rows), torch.tensor([self.parents[r] for r in rows]),
                                torch.tensor([self.paths[r - 1][-1] for r in rows])))

    def setup(self, model) -> None:
        emb = model.get_input_embeddings().weight
        self.device = emb.device
        self.adj = new_successor_matrix(emb.shape[0], self.device)
        self.levels = [tuple(t.to(self.device) for t in lv) for lv in self.levels]

    def start(self, prompt_ids: list[int]) -> None:
        if self.reset_per_prompt:
            self.adj.zero_()
        return None

    def propose(self, tokens: list[int]) -> Block:
        ids = torch.empty(len(self.parents), dtype=torch.long, device=self.device)
        ids[0] = tokens[-1]
        for rows, parent_rows, ranks in self.levels:  # node = adj[parent token, rank]
            ids[rows] = self.adj[ids[parent_rows], ranks]
        return Block(ids, self.parents, self.layout)

    def observe(self, step: Step) -> None:
        recycle(self.adj, step)

