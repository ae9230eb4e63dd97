"""STAND — Stochastic Adaptive N-gram Drafting (Song et al., "Accelerated Test-Time Scaling with Model-Free
Speculative Sampling", EMNLP 2025, arXiv 2506.04708).

No official code exists; this is a reimplementation on the project's decode loop.

Store (logit n-grams): for every observed context c (the last 4, 3 and 2 tokens ending at a position) the
model's next-token distribution there, softmax(logits / T_s) (T_s = the decode temperature when > 0, else
1), truncated to its `top_n` (10) largest entries and NOT renormalised. A context seen again is merged as
    old * k/(k+1) + new * 1/(k+1)      (k = times the context was seen before; union of the ids, missing = 0)
and truncated to `top_n` again (ties: smaller token id first). The store is filled after every forward
from the logits of the verified path (root + accepted drafts): each committed position is observed
exactly once, so at T = 0 the store is a function of the committed text only, not of the tree.
The loop does not hand the prompt's prefill logits to drafters, so prompt positions never enter the logit
store. Instead (`prompt_seed`, default on) the prompt's own token n-grams are counted:
context (4/3/2 prompt tokens) -> next prompt token -> count (ties: the later occurrence first). This is
a separate, per-generation table consulted right after the logit store at the same order.

Drafting: a static tree SHAPE of rank paths (node (r1, r2, …) = the r2-th child of the r1-th child of
the root). For each shape node, in BFS order, the children of its parent are chosen once: the longest
context ending at the parent (orders 4 -> 3 -> 2; at each order the logit store, then the prompt counts)
gives a distribution; K = 1 + the largest child rank in the shape; the children are K distinct tokens
drawn by Gumbel-Top-K (argtop-K of log w + Gumbel noise, a seeded `random.Random`, reseeded per
generation) or by plain top-K of the weights. With `backfill` (default) slots a short distribution cannot
fill are filled from the next sources in the same order, without repeats. A shape node whose rank has no
candidate is dropped together with its subtree, so a step feeds at most 1 + (bc - 1) tokens.

Tree shapes (`tree`): `auto` = the fitted tree for (model_name, bc) from conf/trees/stand/<model>.json
(written by `python -m experiments.fit_trees` on the calib prompts; a file's `trees[bc]`, else the first
bc - 1 nodes of its `ranking`, which is nested, prefix-closed and gap-free in rank), and the rule below,
with a warning, when no file exists; `rule` = always the rule; or a path to such a JSON file.
Fallback rule: the bc - 1 rank paths of highest prior score Π_d A[r_d] with A[0] = 0.5, A[r] = 0.25·0.6^(r-1)
(r = 1..9), found best-first (ties: shallower, then lexicographic). A child always scores below its parent
and rank r+1 below rank r, so the set is prefix- and sibling-closed: a deep rank-0 chain widening towards
the root. The prior was chosen so that at 80 nodes the per-depth profile (8/21/26/18/6/1) is close to Token
Recycling's published 80-node tree (8/21/25/15/8/3).

Sampling (T > 0): with Gumbel children and `rejection` (default), each node's children are ONE
Gumbel-Top-K draw (without replacement) from one distribution q (the longest-context source; no
backfill), and the block carries that draw with q per parent row (`Block.draws`): the loop verifies the
draws by recursive rejection sampling (accept c_i w.p. min(1, r/q_i), residual r <- norm(max(r - q_i, 0))),
which keeps the target distribution exactly (tests/test_stand.py checks it statistically). Every draw is
verified in draw order, also one the tree has no row for; tree shapes are gap-free in rank under every
parent anyway (`check_shape`), so no draw is wasted. With `rejection=false`
or plain top-K, drafts are deterministic given the store and the loop's sample-matching verifier applies,
which reproduces AR's sampled ids exactly.
"""

from __future__ import annotations

import heapq
import math
import random

import torch

from mtp.drafting import RankPath, bfs_order, check_rank_tree, draft_tree, rank_tree_parents
from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Draws, Step, tree_layout

RULE_PRIOR = [0.5] + [0.25 * 0.6 ** (r - 1) for r in range(1, 10)]  # rough P(rank r child accepted | parent)


# --------------------------------------------------------------------------- tree shapes
def check_shape(paths: list[RankPath]) -> None:
    """Rank paths prefix-closed, and gap-free in rank under every parent (rank r only with ranks 0..r-1):
    a node's children are draws 1..K of one Gumbel-Top-K draw, so a missing rank would be a wasted draw."""
    check_rank_tree(paths, "STAND")
    have = set(paths)
    for p in paths:
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in have:
            raise ConfigError(f"STAND tree has a gap in rank: {list(p)} without {list(p[:-1] + (p[-1] - 1,))}")


def rule_tree(n: int, prior: list[float] = RULE_PRIOR, max_depth: int | None = None) -> list[RankPath]:
    """The n rank paths of highest score Π prior[r_d] (best-first; ties: shallower, then lexicographic),
    in selection order (a parent always before its children)."""
    def score(p):
        return math.prod(prior[r] for r in p)

    out: list[RankPath] = []
    heap = [(-score((0,)), 1, (0,))]
    while heap and len(out) < n:
        _, _, p = heapq.heappop(heap)
        out.append(p)
        nxt = []
        if max_depth is None or len(p) < max_depth:
            nxt.append(p + (0,))  # first child
        if p[-1] + 1 < len(prior):
            nxt.append(p[:-1] + (p[-1] + 1,))  # next sibling
        for c in nxt:
            heapq.heappush(heap, (-score(c), len(c), c))
    return out


# --------------------------------------------------------------------------- the store
def merge(entry: tuple[list[int], list[float], int] | None, ids: list[int], probs: list[float], top_n: int):
    """One observation (ids, probs) of a context into its entry (ids, probs, k): old k/(k+1) + new 1/(k+1),
    truncated to the top_n (ties: smaller token id first)."""
    if entry is None:
        k, acc = 0, {}
    else:
        old_ids, old_p, k = entry
        acc = {t: p * k / (k + 1) for t, p in zip(old_ids, old_p)}
    for t, p in zip(ids, probs):
        acc[t] = acc.get(t, 0.0) + p / (k + 1)
    best = sorted(acc.items(), key=lambda tp: (-tp[1], tp[0]))[:top_n]
    return [t for t, _ in best], [p for _, p in best], k + 1


class Stand(Drafter):
    name = "stand"
    min_bc = 2

    def __init__(
        self,
        bc: int = 30,
        tree: str | list = "auto",  # auto | rule | path to a fitted-tree JSON | a list of rank paths
        orders: tuple[int, ...] | list[int] = (4, 3, 2),  # context lengths, longest first
        top_n: int = 10,  # distribution entries kept per context
        persist: bool = False,  # keep the logit store across the prompts of a job (paper: per generation)
        prompt_seed: bool = True,  # count the prompt's token n-grams (consulted after the logit store)
        backfill: bool = True,  # fill missing children from the next (shorter) sources
        gumbel: bool | None = None,  # Gumbel-Top-K children; None = on iff temperature > 0
        temperature: float = 0.0,  # the decode temperature (store temperature and gumbel=None)
        model_name: str | None = None,  # finds conf/trees/stand/<model_name>.json
        rejection: bool = True,  # T > 0 with Gumbel: children drawn from one q, verified by recursive rejection
        seed: int = 0,
    ):
        if bc < self.min_bc:
            raise ConfigError(f"bc={bc} is too small for STAND: needs bc >= {self.min_bc} (root + one draft)")
        orders = sorted({int(n) for n in orders}, reverse=True)
        if not orders or orders[-1] < 1:
            raise ConfigError(f"method.orders={orders}: expected context lengths >= 1, e.g. [4, 3, 2]")
        if top_n < 1:
            raise ConfigError(f"method.top_n={top_n} must be >= 1")
        self.bc, self.orders, self.max_n, self.top_n = bc, orders, orders[0], top_n
        self.persist, self.prompt_seed, self.backfill, self.seed = persist, prompt_seed, backfill, seed
        self.temperature = float(temperature or 0.0)
        self.gumbel = (self.temperature > 0) if gumbel is None else bool(gumbel)
        self.store_temperature = self.temperature if self.temperature > 0 else 1.0
        # speculative sampling proper: every child set is a draw without replacement from one q (no backfill)
        self.rejection = bool(rejection) and self.gumbel and self.temperature > 0
        self.random_drafts = self.rejection
        budget = bc - 1

        paths, self.tree_source = draft_tree("stand", tree, bc, model_name,
                                             lambda bc: rule_tree(bc - 1, RULE_PRIOR[:top_n]))
        paths = bfs_order(paths)
        if not paths:
            raise ConfigError("STAND tree is empty: give at least one rank path, e.g. [[0]]")
        check_shape(paths)
        if len(paths) > budget:
            raise ConfigError(f"STAND tree has {len(paths)} nodes: 1 + {len(paths)} tokens per forward exceed bc={bc}")
        if max(p[-1] for p in paths) >= top_n:
            raise ConfigError(f"STAND tree uses child rank {max(p[-1] for p in paths)} but the store keeps top_n={top_n}")
        self.paths = paths
        index = {p: i for i, p in enumerate(paths)}
        # shape node i: parent shape index (-1 = root), rank; n_children[parent index + 1] = K
        self.node_parent = [index[p[:-1]] if len(p) > 1 else -1 for p in paths]
        self.node_rank = [p[-1] for p in paths]
        self.n_children = [0] * (len(paths) + 1)
        for par, r in zip(self.node_parent, self.node_rank):
            self.n_children[par + 1] = max(self.n_children[par + 1], r + 1)
        self.full_layout = tree_layout(rank_tree_parents(paths), static=True)  # when every node is drafted
        self.store: dict[tuple[int, ...], tuple[list[int], list[float], int]] = {}
        self.prompt_counts: dict[tuple[int, ...], dict[int, list[int]]] = {}
        self.rng = random.Random(seed)
        self.row_paths: list[RankPath] = [()]
        self._hist: tuple[int, ...] = ()

    # ------------------------------------------------------------------ state
    def setup(self, model) -> None:
        self.store = {}
        self.prompt_counts = {}

    def start(self, prompt_ids: list[int]) -> None:
        """Per generation: reseed the RNG, reset the store unless `persist`, count the prompt's n-grams."""
        self.rng = random.Random(self.seed)
        if not self.persist:
            self.store = {}
        self.prompt_counts = {}
        if self.prompt_seed:
            self.seed_prompt(prompt_ids)
        return None

    def seed_prompt(self, prompt_ids: list[int]) -> None:
        for i in range(len(prompt_ids) - 1):
            nxt = prompt_ids[i + 1]
            for n in self.orders:
                if i + 1 >= n:
                    slot = self.prompt_counts.setdefault(tuple(prompt_ids[i + 1 - n : i + 1]), {})
                    c = slot.setdefault(nxt, [0, 0])
                    c[0] += 1
                    c[1] = i  # last occurrence
        return None

    def add(self, context: tuple[int, ...], ids: list[int], probs: list[float]) -> None:
        """One observed next-token distribution after `context` (tokens ending at the position)."""
        for n in self.orders:
            if len(context) >= n:
                key = tuple(context[-n:])
                self.store[key] = merge(self.store.get(key), ids, probs, self.top_n)

    def top_dist(self, logits: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
        """Rows (m, V) of logits -> the top_n (ids, probs) of softmax(logits / T_s) per row."""
        probs = torch.softmax(logits.float() / self.store_temperature, dim=-1)
        top = torch.topk(probs, min(self.top_n, probs.shape[-1]), dim=-1)
        return top.indices.tolist(), top.values.tolist()

    def observe_logits(self, contexts: list[tuple[int, ...]], logits: torch.Tensor) -> None:
        """Rows of `logits` (m, V) are the next-token logits after each of the m contexts, in order."""
        for ctx, ids, ps in zip(contexts, *self.top_dist(logits)):
            self.add(ctx, ids, ps)

    def observe(self, step: Step) -> None:
        ids = step.block.ids.tolist()
        seq, contexts = self._hist, []
        for j, row in enumerate(step.path):
            if j:
                seq = (seq + (ids[row],))[-self.max_n :]
            contexts.append(seq)
        self.observe_logits(contexts, step.logits[step.path])

    # ------------------------------------------------------------------ drafting
    def sources(self, context: tuple[int, ...]) -> list[tuple[list[int], list[float]]]:
        """The distributions for the next token after `context`, most specific first: for n in orders,
        the logit store, then the prompt counts (top_n by count, later occurrence first)."""
        out = []
        for n in self.orders:
            if len(context) < n:
                continue
            key = tuple(context[-n:])
            entry = self.store.get(key)
            if entry is not None:
                out.append((entry[0], entry[1]))
            counts = self.prompt_counts.get(key) if self.prompt_seed else None
            if counts:
                best = sorted(counts.items(), key=lambda tc: (-tc[1][0], -tc[1][1]))[: self.top_n]
                out.append(([t for t, _ in best], [float(c[0]) for _, c in best]))
        return out

    def children(self, context: tuple[int, ...], k: int) -> tuple[list[int], Draws | None]:
        """k distinct next tokens after `context` (fewer if the store has fewer), and, when they are one
        Gumbel-Top-K draw of a single distribution (rejection mode), that draw with its q."""
        chosen: list[int] = []
        srcs = self.sources(context)
        if self.rejection:
            srcs = srcs[:1]
        for ids, w in srcs:
            have = set(chosen)
            pool = [(t, x) for t, x in zip(ids, w) if t not in have and x > 0]
            if self.gumbel:
                keys = [math.log(x) - math.log(max(self.rng.expovariate(1.0), 1e-300)) for _, x in pool]  # + Gumbel
                order = sorted(range(len(pool)), key=lambda i: -keys[i])
                pool = [pool[i] for i in order]
            chosen += [t for t, _ in pool[: k - len(chosen)]]
            if len(chosen) >= k or not self.backfill:
                break
        if self.rejection and srcs:
            ids, w = srcs[0]
            total = sum(w)
            return chosen, Draws(list(ids), [x / total for x in w], list(chosen))
        return chosen, None

    def draft(self, hist: tuple[int, ...]):
        """Tree rows (ids, parents, rank path of each row) rooted at hist[-1], and {row: Draws} (rejection mode)."""
        ids, parents, rows = [hist[-1]], [-1], [()]
        seqs = [tuple(hist[-self.max_n :])]
        row_of = {-1: 0}
        cands: dict[int, list[int]] = {}
        draws: dict[int, Draws] = {}
        for i, (par, r) in enumerate(zip(self.node_parent, self.node_rank)):
            prow = row_of.get(par)
            if prow is None:
                continue
            c = cands.get(prow)
            if c is None:
                c, drawn = self.children(seqs[prow], self.n_children[par + 1])
                cands[prow] = c
                if drawn is not None:
                    draws[prow] = drawn
            if r >= len(c):
                continue
            row_of[i] = len(ids)
            ids.append(c[r])
            parents.append(prow)
            rows.append(self.paths[i])
            seqs.append((seqs[prow] + (c[r],))[-self.max_n :])
        return ids, parents, rows, draws

    def propose(self, tokens: list[int]) -> Block:
        self._hist = tuple(tokens[-self.max_n :])
        ids, parents, self.row_paths, draws = self.draft(self._hist)
        layout = self.full_layout if len(ids) == len(self.paths) + 1 else tree_layout(parents)  # whole shape: reuse
        return Block(torch.tensor(ids, dtype=torch.long), parents, layout, draws=draws or None)
