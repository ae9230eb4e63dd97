"""ESP — embedding-space probing (METHODS §1): k mask embeddings synthesized from the model's own input
embeddings ride along every forward; their logits propose the next token tree.

Block layout per step (T = n (k+1) rows, n = 1 + ΣK_i tree rows):
    [root | node_1 … node_N (BFS) | masks(root) | masks(node_1) | … | masks(node_N)]
    depth:  node at tree depth d -> d;   mask j (1..k) of owner b -> depth(b) + j
    attend: nodes see ancestors + self; mask j of b sees b's attend-set + masks 1..j of b
After verification, the masks of the deepest accepted node b were computed on the committed prefix: mask
j of b sits j slots after b, so its logits propose depth j of the next tree (rooted at the bonus token).
"""

from __future__ import annotations

import torch

from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Step, tree_layout

# paper defaults (METHODS §1): bc -> k masks; Llama family uses 2 masks at bc 60, Qwen3 one
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


def esp_layout(parents: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    return depth, allowed


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
        init: str = "mean",  # mean | last_k | sample | ood | recent
        ood_sigmas: float = 5.0,  # ood init: mu + ood_sigmas * sigma
        lam: float = 0.1,  # EMA rate: m <- m + lam (e_new - m)
        ema: str = "token",  # token: once per committed token, in order | step: once per step, last token
        momentum: float = 0.0,  # velocity term: v <- momentum v + lam (e - m); m <- m + v (0 = the paper's EMA)
        depth_lam: bool = False,  # mask j moves at lam / j (a far mask follows the text more slowly)
        init_window: int = 16,  # recent init: recency-weighted mean, weights exp(-age / init_window)
        impl: str = "efficient",  # efficient: static layout built once | naive: rebuilt every step
        family: str | None = None,  # model family, for the paper's bc-60 default (qwen3: k=1)
        seed: int = 0,
    ):
        for key, val, allowed in (("tree", tree, ("static", "dynamic")), ("init", init, ("mean", "last_k", "sample", "ood", "recent")),
                                  ("ema", ema, ("token", "step")), ("impl", impl, ("efficient", "naive"))):
            if val not in allowed:
                raise ConfigError(f"method.{key}={val!r}: expected one of {list(allowed)}")
        if widths is not None and k is not None and len(widths) != k:
            raise ConfigError(f"method.widths={widths} has {len(widths)} depths but method.k={k}")
        self.k = k if k is not None else len(widths) if widths is not None else default_k(bc, family)
        if self.k < 1:
            raise ConfigError(f"method.k={self.k}: ESP needs at least one mask")
        self.bc, self.tree, self.pruner, self.init = bc, tree, pruner, init
        self.ood_sigmas, self.lam, self.ema, self.impl, self.seed = ood_sigmas, lam, ema, impl, seed
        self.momentum, self.depth_lam, self.init_window = momentum, depth_lam, init_window
        if tree == "static":
            self.widths = list(widths) if widths is not None else fit_widths(bc, self.k)
            if min(self.widths) < 1 or (self.k + 1) * (1 + sum(self.widths)) > bc:
                raise ConfigError(
                    f"ESP widths {self.widths} with k={self.k} feed {(self.k + 1) * (1 + sum(self.widths))} "
                    f"tokens per forward, more than bc={bc}")
            self.min_bc = (self.k + 1) * (1 + sum(self.widths))
            self.parents = static_parents(self.widths)
            self.layout = esp_layout(self.parents, self.k)  # efficient path: built once, reused every step
        else:
            self.budget = bc // (self.k + 1)  # B: tree rows (root included), each with k masks
            if self.budget < 2:
                raise ConfigError(f"bc={bc} is too small for a dynamic ESP tree with k={self.k}: needs bc >= {2 * (self.k + 1)}")
            self.min_bc = 2 * (self.k + 1)

    # ------------------------------------------------------------------ state
    def setup(self, model) -> None:
        self.table = model.get_input_embeddings().weight.detach()
        self.mu = self.table.float().mean(0)
        self.sigma = self.table.float().std(0)

    def prefill_probes(self, prompt_ids: list[int]) -> torch.Tensor:
        """Init the masks (k, H) from the prompt and return them: the prefill is [prompt | m x k]."""
        k, table = self.k, self.table
        if self.init == "mean":
            m = table[torch.tensor(prompt_ids, device=table.device)].float().mean(0).expand(k, -1)
        elif self.init == "last_k":  # m_i = e_{t-k+i}
            last = prompt_ids[-k:] if len(prompt_ids) >= k else [prompt_ids[0]] * (k - len(prompt_ids)) + prompt_ids
            m = table[torch.tensor(last, device=table.device)].float()
        elif self.init == "recent":  # context-weighted: the latest prompt tokens weigh most
            ids = torch.tensor(prompt_ids, device=table.device)
            age = torch.arange(len(prompt_ids) - 1, -1, -1, device=table.device, dtype=torch.float)
            w = torch.exp(-age / self.init_window)
            m = ((w[:, None] * table[ids].float()).sum(0) / w.sum()).expand(k, -1)
        elif self.init == "sample":
            g = torch.Generator(device=table.device).manual_seed(self.seed)
            m = (self.mu + self.sigma * torch.randn(self.mu.shape, generator=g, device=table.device)).expand(k, -1)
        else:  # ood
            m = (self.mu + self.ood_sigmas * self.sigma).expand(k, -1)
        self.masks = m.clone()
        self.velocity = torch.zeros_like(self.masks)
        return self.masks

    def observe_prefill(self, probe_logits: torch.Tensor, root: int) -> None:
        self.mask_logits = probe_logits  # (k, V): mask j proposes depth j under the first root
        self._update_masks([root])

    def observe(self, step: Step) -> None:
        b = step.path[-1]  # deepest accepted node: its masks saw the committed prefix
        first = step.block.n_tree + b * self.k
        self.mask_logits = step.logits[first : first + self.k]
        self._update_masks(step.committed)

    def _update_masks(self, committed: list[int]) -> None:
        """EMA towards committed tokens' embeddings: m <- m + lam (e - m); rejected drafts never enter.
        With momentum, m moves by a velocity v <- momentum v + lam (e - m); with depth_lam mask j uses lam / j."""
        tokens = committed if self.ema == "token" else committed[-1:]
        e = self.table[torch.tensor(tokens, device=self.table.device)].float()
        lam = self.lam
        if self.depth_lam:
            lam = self.lam / torch.arange(1, self.k + 1, device=e.device, dtype=torch.float)[:, None]
        for row in e:
            if self.momentum:
                self.velocity.mul_(self.momentum).add_(lam * (row - self.masks))
                self.masks += self.velocity
            else:
                self.masks += lam * (row - self.masks)

    # ------------------------------------------------------------------ proposal
    def propose(self, tokens: list[int]) -> Block:
        root = tokens[-1]
        if self.tree == "static":
            ids = [root] + self._static_candidates(root)
            parents = self.parents
            depth, allowed = self.layout if self.impl == "efficient" else esp_layout(parents, self.k)
        else:
            ids, parents = self._dynamic_tree(root)
            depth, allowed = esp_layout(parents, self.k)
        embeds = self.masks.to(self.table.dtype).repeat(len(parents), 1)  # (n*k, H): k masks per tree row
        return Block(torch.tensor(ids, dtype=torch.long), parents, depth, allowed, embeds)

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
