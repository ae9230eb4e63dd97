"""ESP — embedding-space probing ("Efficient Training-Free Multi-Token Prediction via Embedding-Space
Probing", arXiv 2603.17942): k mask embeddings synthesized from the model's own input embeddings
(`mtp.masks`) ride along every forward; their logits propose the next token tree.

Block layout per step (T = n (k+1) rows, n = 1 + ΣK_i tree rows):
    [root | node_1 … node_N (BFS) | masks(root) | masks(node_1) | … | masks(node_N)]
    depth:  node at tree depth d -> d;   mask j (1..k) of owner b -> depth(b) + j
    attend: nodes see ancestors + self; mask j of b sees b's attend-set + masks 1..j of b
After verification, the masks of the deepest accepted node b were computed on the committed prefix: mask
j of b sits j slots after b, so its logits propose depth j of the next tree (rooted at the bonus token).

Trees: `static` (the paper's default) puts K_i candidates from mask i under the top-1 candidate of depth
i - 1, widths fitted to bc (`fit_widths`); `dynamic` is the paper's Algorithm 1 (pools ranked by
cumulative probability within a budget of bc // (k + 1) tree rows). The pruner skips a candidate equal to
its parent's token. The paper's defaults: k = 1 mask at bc 10 and 30, 2 at bc 60 (Qwen3: 1), 3 at bc 120.
"""

from __future__ import annotations

import torch

from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Layout, Step, tree_layout
from mtp.masks import MaskEmbeddings

# the paper's defaults: bc -> k masks; Llama family uses 2 masks at bc 60, Qwen3 one
PAPER_K = {10: 1, 30: 1, 60: 2, 120: 3}
PAPER_K_QWEN3 = {60: 1}
# share of a node budget given to each depth when fitting widths: [15,4] of 19, [15,10,4] of 29
WIDTH_SHARES = {1: [1.0], 2: [0.8, 0.2], 3: [0.5, 0.35, 0.15]}


def default_k(bc: int, family: str | None) -> int:
    if family == "qwen3" and bc in PAPER_K_QWEN3:
        return PAPER_K_QWEN3[bc]
    if bc in PAPER_K:
        return PAPER_K[bc]
    return 1 if bc < 60 else 2 if bc < 120 else 3


def fit_widths(bc: int, k: int) -> list[int]:
    """Static widths [K_1..K_k] with (k+1)(1+ΣK_i) <= bc: the node budget bc//(k+1) - 1 split by
    WIDTH_SHARES (largest remainder; every K_i >= 1). Reproduces the paper's trees at bc 10/30/60/120."""
    budget = bc // (k + 1) - 1
    if budget < k:
        raise ConfigError(f"bc={bc} is too small for ESP with k={k} masks: needs bc >= {(k + 1) * (k + 1)}")
    shares = WIDTH_SHARES.get(k) or [1.0 / k] * k
    raw = [budget * s for s in shares]
    widths = [max(1, int(r)) for r in raw]
    order = sorted(range(k), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while sum(widths) < budget:
        widths[order[i % k]] += 1
        i += 1
    while sum(widths) > budget:  # only when the max(1, .) floors overshoot
        j = max(range(k), key=lambda i: widths[i])
        widths[j] -= 1
    return widths


def esp_layout(parents: list[int], k: int, static: bool = False) -> Layout:
    """depth (T,) and block-local attention (T, T) of a tree whose every row carries k masks."""
    tree_depth, tree_allowed = tree_layout(parents)
    n = len(parents)
    T = n * (k + 1)
    depth = torch.zeros(T, dtype=torch.long)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    depth[:n], allowed[:n, :n] = tree_depth, tree_allowed
    for b in range(n):
        first = n + b * k
        for j in range(1, k + 1):
            r = first + j - 1
            depth[r] = tree_depth[b] + j
            allowed[r, :n] = tree_allowed[b]
            allowed[r, first : r + 1] = True
    return Layout(depth, allowed, static)


def static_parents(widths: list[int]) -> list[int]:
    """Top-1 expansion: depth-i candidates all hang under the first (top-1) node of depth i-1."""
    parents, first = [-1], 0
    for w in widths:
        parents += [first] * w
        first = len(parents) - w
    return parents


class ESP(Drafter):
    name = "esp"

    def __init__(
        self,
        bc: int,
        k: int | None = None,  # masks per block token; null = paper default for bc (and family)
        widths: list[int] | None = None,  # static [K_1..K_k]; null = fitted to bc
        tree: str = "static",  # static | dynamic (Algorithm 1)
        pruner: bool = True,  # skip a candidate equal to its parent's token
        impl: str = "efficient",  # efficient: static layout built once | naive: rebuilt every step
        family: str | None = None,  # model family, for the paper's bc-60 default (qwen3: k=1)
        **mask_options,  # init, lam, ema, momentum, depth_lam, init_window, ood_sigmas, seed: see mtp.masks
    ):
        for key, val, allowed in (("tree", tree, ("static", "dynamic")), ("impl", impl, ("efficient", "naive"))):
            if val not in allowed:
                raise ConfigError(f"method.{key}={val!r}: expected one of {list(allowed)}")
        if widths is not None and k is not None and len(widths) != k:
            raise ConfigError(f"method.widths={widths} has {len(widths)} depths but method.k={k}")
        self.k = k if k is not None else len(widths) if widths is not None else default_k(bc, family)
        self.masks = MaskEmbeddings(self.k, **mask_options)
        self.bc, self.tree, self.pruner, self.impl = bc, tree, pruner, impl
        if tree == "static":
            self.widths = list(widths) if widths is not None else fit_widths(bc, self.k)
            if min(self.widths) < 1 or (self.k + 1) * (1 + sum(self.widths)) > bc:
                raise ConfigError(
                    f"ESP widths {self.widths} with k={self.k} feed {(self.k + 1) * (1 + sum(self.widths))} "
                    f"tokens per forward, more than bc={bc}")
            self.min_bc = (self.k + 1) * (1 + sum(self.widths))
            self.parents = static_parents(self.widths)
            self.layout = esp_layout(self.parents, self.k, static=True)  # efficient: built once, reused every step
        else:
            self.budget = bc // (self.k + 1)  # B: tree rows (root included), each with k masks
            if self.budget < 2:
                raise ConfigError(f"bc={bc} is too small for a dynamic ESP tree with k={self.k}: needs bc >= {2 * (self.k + 1)}")
            self.min_bc = 2 * (self.k + 1)

    # ------------------------------------------------------------------ state
    def setup(self, model) -> None:
        self.masks.setup(model)

    def start(self, prompt_ids: list[int]) -> torch.Tensor:
        """Init the masks from the prompt and return them: the prefill is [prompt | m x k]."""
        return self.masks.start(prompt_ids)

    def observe_prefill(self, probe_logits: torch.Tensor, root: int, root_logits: torch.Tensor) -> None:
        self.mask_logits = probe_logits  # (k, V): mask j proposes depth j under the first root
        self.masks.update([root])

    def observe(self, step: Step) -> None:
        b = step.path[-1]  # deepest accepted node: its masks saw the committed prefix
        first = step.block.n_tree + b * self.k
        self.mask_logits = step.logits[first : first + self.k]
        self.masks.update(step.committed)

    # ------------------------------------------------------------------ proposal
    def propose(self, tokens: list[int]) -> Block:
        root = tokens[-1]
        if self.tree == "static":
            ids = [root] + self._static_candidates(root)
            parents = self.parents
            layout = self.layout if self.impl == "efficient" else esp_layout(parents, self.k)
        else:
            ids, parents = self._dynamic_tree(root)
            layout = esp_layout(parents, self.k)
        embeds = self.masks.rows(len(parents))  # (n*k, H): k masks per tree row
        return Block(torch.tensor(ids, dtype=torch.long), parents, layout, embeds)

    def _ranked(self, width: int) -> list[list[int]]:
        """Top (width + 1) tokens of each mask's logits, best first (one extra for the pruner)."""
        return torch.topk(self.mask_logits, min(width + 1, self.mask_logits.shape[-1]), dim=-1).indices.tolist()

    def _pick(self, ranked: list[int], parent_token: int, width: int) -> list[int]:
        if self.pruner:
            ranked = [t for t in ranked if t != parent_token]
        return ranked[:width]

    def _static_candidates(self, root: int) -> list[int]:
        ranked = self._ranked(max(self.widths))
        out, parent_token = [], root
        for i, w in enumerate(self.widths):
            picked = self._pick(ranked[i], parent_token, w)
            out += picked
            parent_token = picked[0]  # depth i+1 hangs under depth i's top-1
        return out

    def _dynamic_tree(self, root: int) -> tuple[list[int], list[int]]:
        """Algorithm 1: at depth i a pool of B-i candidates from mask i under the depth-(i-1) top-1;
        keep the B-1 with the highest cumulative probability (children never outrank their parent)."""
        B = self.budget
        probs = torch.softmax(self.mask_logits.float(), dim=-1)
        top = torch.topk(probs, min(B, probs.shape[-1]), dim=-1)
        top_p, top_i = top.values.tolist(), top.indices.tolist()
        pool = []  # (cumulative prob, depth, rank, token)
        parent_token, parent_p = root, 1.0
        for i in range(1, self.k + 1):
            size = B - i
            if size < 1:
                break
            cands = [(p, t) for p, t in zip(top_p[i - 1], top_i[i - 1]) if not (self.pruner and t == parent_token)][:size]
            pool += [(parent_p * p, i, r, t) for r, (p, t) in enumerate(cands)]
            parent_p, parent_token = parent_p * cands[0][0], cands[0][1]
        kept, have_top1 = [], {0}
        for cum, d, r, t in sorted(pool, key=lambda c: (-c[0], c[1], c[2])):
            if len(kept) == B - 1:
                break
            if d - 1 in have_top1:  # ancestor closure: the depth-(d-1) top-1 is already in
                kept.append((d, r, t))
                if r == 0:
                    have_top1.add(d)
        kept.sort()  # BFS: by depth, then rank (the top-1 of each depth first)
        ids, parents, top1_row = [root], [-1], {0: 0}
        for d, r, t in kept:
            if r == 0:
                top1_row[d] = len(ids)
            parents.append(top1_row[d - 1])
            ids.append(t)
        return ids, parents
