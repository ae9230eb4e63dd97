"""Token Recycling (Luo et al., ACL 2025; METHODS §2.1).

An adjacency matrix `adj` (V x 8 token ids) holds, for every token, the top-8 tokens the model last
predicted after it. Each step drafts a static tree of rank paths from it by gathers, depth by depth:
node (r1, r2, …) = adj[adj[root, r1], r2]…; after each forward every block row's top-8 overwrites its
token's row. The matrix persists across the prompts of a job (hot start) unless `reset_per_prompt`.

Trees: the published 80-draft template (bc 81); for bc 10 and 30 the fallback trees of METHODS §2.1;
for any other bc the template's bc - 1 nodes of highest prior score Π_d RANK_PRIOR[r_d] (a parent always
outscores its child, so the kept set is prefix-closed).
"""

from __future__ import annotations

import torch

from mtp.loop import Block, Drafter, Step, tree_layout

TOPK = 8


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
RANK_PRIOR = [0.60, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01]  # rough P(rank r is the accepted child)


def tree_for_bc(bc: int) -> list[tuple[int, ...]]:
    """Rank paths of bc - 1 drafts (or the whole template when bc >= 81), in BFS order."""
    if bc in FALLBACK:
        paths = FALLBACK[bc]
    elif bc - 1 >= len(TEMPLATE_80):
        paths = TEMPLATE_80
    else:
        def score(p):
            s = 1.0
            for r in p:
                s *= RANK_PRIOR[r]
            return s

        paths = sorted(TEMPLATE_80, key=lambda p: (-score(p), len(p), p))[: bc - 1]
    return sorted(paths, key=lambda p: (len(p), p))


class TokenRecycling(Drafter):
    name = "recycling"
    min_bc = 2

    def __init__(self, bc: int, reset_per_prompt: bool = False):
        self.reset_per_prompt = reset_per_prompt
        self.paths = tree_for_bc(bc)
        row = {(): 0} | {p: i + 1 for i, p in enumerate(self.paths)}
        missing = [p for p in self.paths if p[:-1] not in row]
        assert not missing, f"tree not prefix-closed: {missing}"
        self.parents = [-1] + [row[p[:-1]] for p in self.paths]
        self.layout = tree_layout(self.parents)  # static: built once
        # per depth: rows filled at that depth, their parents' rows, their ranks
        depths = sorted({len(p) for p in self.paths})
        self.levels = [
            (torch.tensor([row[p] for p in self.paths if len(p) == d]),
             torch.tensor([row[p[:-1]] for p in self.paths if len(p) == d]),
             torch.tensor([p[-1] for p in self.paths if len(p) == d]))
            for d in depths
        ]

    def setup(self, model) -> None:
        emb = model.get_input_embeddings().weight
        self.device = emb.device
        self.adj = torch.zeros(emb.shape[0], TOPK, dtype=torch.long, device=self.device)
        self.levels = [tuple(t.to(self.device) for t in lv) for lv in self.levels]

    def prefill_probes(self, prompt_ids: list[int]) -> None:
        if self.reset_per_prompt:
            self.adj.zero_()
        return None

    def propose(self, tokens: list[int]) -> Block:
        ids = torch.empty(len(self.parents), dtype=torch.long, device=self.device)
        ids[0] = tokens[-1]
        for rows, parent_rows, ranks in self.levels:  # node = adj[parent token, rank]
            ids[rows] = self.adj[ids[parent_rows], ranks]
        depth, allowed = self.layout
        return Block(ids, self.parents, depth, allowed)

    def observe(self, step: Step) -> None:
        recycle(self.adj, step)


def recycle(adj: torch.Tensor, step: Step) -> None:
    """adj[token_i] = top-8 of tree row i's logits, for every tree row of the block; on duplicate tokens
    the accepted-path row wins, then the later row in BFS order."""
    ids = step.block.ids[: step.block.n_tree]
    on_path = set(step.path)
    order = [i for i in range(len(ids)) if i not in on_path] + list(step.path)
    last = {t: i for i, t in zip(order, ids[order].tolist())}  # later in `order` overwrites
    rows = torch.tensor(list(last.values()), device=adj.device)
    adj[ids[rows].to(adj.device)] = torch.topk(step.logits[rows], adj.shape[1], dim=-1).indices
