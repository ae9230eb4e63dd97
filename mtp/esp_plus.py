"""ESP+ (ours, beyond the paper) — one block budget, three training-free sources, one merged tree.

Candidate children of a tree node carrying token t at depth d come from (`mtp.drafting` holds the first
two, `mtp.masks` the third):
  recycling  adj[t, r], r < 8: the model's top-8 after t when t was last in a block (Token Recycling's
             successor matrix, kept across the job's prompts)
  ngram      copies of the context: the continuations of earlier occurrences of the text's last n tokens
             (n = max_ngram_size .. 1, PLD's matcher), followed down the tree as long as the tree matches them
  esp        the top esp_width tokens of mask j's logits, under every node of depth j - 1 (the masks of the
             last step's deepest accepted node saw the committed prefix: mask j proposes depth j)
Every (source, bucket) — a recycling rank, an n-gram depth, an ESP (depth, rank) — has an acceptance rate
a = P(child accepted | parent accepted), counted over recent steps (decayed counts plus a prior). A token
proposed by several sources for the same parent is one node with rate 1 - Π(1 - a_i). A node's score is
the product of the rates on its path, an estimate of the probability that verification reaches it; the
tree is the top n_tree nodes by score. A child always scores below its parent, so that set is prefix
closed, and it is grown level by level with tensor ops (a top-k per level, no loop over nodes). The rates
are what split the budget between the sources, anew at every step.

Masks (k rows each) ride on the `mask_rows` nodes most likely to be the deepest accepted one (score minus
its children's scores), not on every node as in ESP: T = n_tree + mask_rows * k <= bc. When the deepest
accepted node carries no masks, the next step has no ESP candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy
import torch

from mtp.drafting import RANK_PRIOR, SUCCESSORS, copy_matches, new_successor_matrix, recycle
from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Layout, Step, bare_forward_s
from mtp.masks import MaskEmbeddings

SOURCES = ("recycling", "ngram", "esp")
MAX_RATE = 0.95  # a child scores at most 0.95 x its parent: the top-n set stays prefix-closed


def tree_masks(parents: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self attention (n, n) of a BFS-ordered tree, one tensor op per depth level."""
    n = parents.shape[0]
    allowed = torch.eye(n, dtype=torch.bool, device=parents.device)
    for d in range(1, int(depth.max()) + 1):
        rows = (depth == d).nonzero().flatten()
        allowed[rows] |= allowed[parents[rows]]
    return allowed


def with_masks(allowed: torch.Tensor, depth: torch.Tensor, owners: torch.Tensor, k: int) -> Layout:
    """The layout of a tree plus k mask rows for each owner node (after the tree rows, owner by owner):
    mask j of b sits at depth(b) + j and sees b's ancestors, b, and b's masks 1..j."""
    n, q = allowed.shape[0], owners.shape[0]
    T = n + q * k
    full = torch.zeros(T, T, dtype=torch.bool, device=allowed.device)
    full[:n, :n] = allowed
    full[n:, :n] = allowed[owners].repeat_interleave(k, dim=0)
    if q:
        full[n:, n:] = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool, device=allowed.device).tril()] * q)
    j = torch.arange(1, k + 1, device=depth.device).repeat(q)
    return Layout(torch.cat([depth, depth[owners].repeat_interleave(k) + j]), full)


@dataclass
class Nodes:
    """Candidate tree nodes (one tensor entry per node): token, score (the estimated probability that
    verification reaches the node), parent (index among all candidates, -1 for the root), depth, and the
    rate buckets that proposed it (member, (n, buckets) bool)."""

    tok: torch.Tensor
    score: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    member: torch.Tensor

    @classmethod
    def cat(cls, levels: list["Nodes"]) -> "Nodes":
        return cls(*(torch.cat([getattr(lv, f.name) for lv in levels]) for f in fields(cls)))


@dataclass
class Draft:
    """What a proposal leaves for `observe`: the buckets behind each tree row, the parent rows, the sum of
    the drafts' scores (tokens expected) and the rows that carry masks."""

    member: torch.Tensor
    parents: torch.Tensor
    expected: float
    owners: torch.Tensor | None


class ESPPlus(Drafter):
    name = "esp_plus"

    def __init__(
        self,
        bc: int,
        sources: list[str] = SOURCES,  # any of recycling | ngram | esp
        adaptive: bool = True,  # rates counted online; false: the fixed priors
        k: int = 1,  # masks per mask-carrying node
        mask_rows: int = 1,  # nodes that carry masks
        esp_width: int = 8,  # candidates per mask
        max_ngram_size: int = 3,
        ngram_chains: int = 4,  # distinct context continuations followed
        ngram_depth: int = 16,  # tokens per continuation
        max_depth: int = 16,
        size: str = "full",  # full: fill the bc budget | cost: stop where expected tokens per second peaks
        cost_cache_len: int = 256,  # cache length of the forward-time curve measured for size=cost
        decay: float = 0.98,  # per step, on the acceptance counts
        prior_weight: float = 4.0,  # pseudo-observations of the prior rate
        **mask_options,  # the masks' init, lam, ema, momentum, depth_lam, init_window, ood_sigmas, seed (mtp.masks)
    ):
        unknown = set(sources) - set(SOURCES)
        if unknown or not sources:
            raise ConfigError(f"method.sources={list(sources)}: expected a non-empty subset of {list(SOURCES)}")
        if min(k, esp_width, ngram_chains, ngram_depth, max_depth) < 1 or mask_rows < 0:
            raise ConfigError("method.k, esp_width, ngram_chains, ngram_depth, max_depth must be >= 1, mask_rows >= 0")
        if size not in ("full", "cost"):
            raise ConfigError(f"method.size={size!r}: expected full or cost")
        self.masks = MaskEmbeddings(k, **mask_options)
        self.bc, self.size, self.cost_cache_len = bc, size, cost_cache_len
        self.sources = set(sources)
        self.use_esp = "esp" in self.sources and mask_rows > 0
        self.k, self.mask_rows = k, (mask_rows if self.use_esp else 0)
        self.n_tree = bc - self.mask_rows * k
        if self.n_tree < 2:
            raise ConfigError(f"bc={bc} is too small for ESP+ with {mask_rows} mask rows of k={k}: needs bc >= {mask_rows * k + 2}")
        self.min_bc = self.mask_rows * k + 2
        self.adaptive, self.decay, self.prior_weight = adaptive, decay, prior_weight
        self.esp_width, self.max_depth = esp_width, max_depth
        self.max_ngram_size, self.ngram_chains, self.ngram_depth = max_ngram_size, ngram_chains, min(ngram_depth, max_depth)
        # rate buckets: recycling ranks, n-gram depths, ESP (depth, rank)
        self.b_ngram = SUCCESSORS
        self.b_esp = SUCCESSORS + self.ngram_depth
        n_buckets = self.b_esp + k * esp_width
        prior = torch.zeros(n_buckets)
        prior[:SUCCESSORS] = torch.tensor(RANK_PRIOR)
        prior[self.b_ngram : self.b_esp] = 0.5
        prior[self.b_esp :] = (0.2 / torch.arange(1, esp_width + 1)).repeat(k)
        self.prior = prior

    # ------------------------------------------------------------------ state
    def setup(self, model) -> None:
        """Job-level state: the successor matrix, the acceptance counts, the masks' embedding table and,
        for size=cost, this device's forward-time curve."""
        self.masks.setup(model)
        emb = model.get_input_embeddings().weight
        self.device = emb.device
        self.adj = new_successor_matrix(emb.shape[0], self.device)
        self.adj_filled = torch.zeros(emb.shape[0], dtype=torch.bool, device=self.device)
        self.prior = self.prior.to(self.device)
        self.accepted = torch.zeros_like(self.prior)
        self.offered = torch.zeros_like(self.prior)
        self.drafts_expected = self.drafts_accepted = 0.0  # Σ scores of the drafted nodes vs drafts accepted
        self.mask_logits = None
        if self.size == "cost":  # forward seconds for every block size 1..bc, interpolated from a grid
            grid = sorted({n for n in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128) if n < self.bc} | {self.bc})
            secs = [bare_forward_s(model, self.cost_cache_len, n, repeats=3) for n in grid]
            curve = numpy.maximum.accumulate(numpy.interp(numpy.arange(self.bc + 1), grid, secs))  # monotone in size
            self.t_of = torch.tensor(curve, dtype=torch.float, device=self.device)
        self._onehot = torch.eye(self.prior.shape[0], device=self.device)
        width = SUCCESSORS + self.ngram_chains + self.esp_width  # most candidate columns per node
        self._later = torch.ones(width, width, dtype=torch.bool, device=self.device).triu(1)

    def start(self, prompt_ids: list[int]) -> torch.Tensor | None:
        """Per generation: no mask logits yet; the masks (when used) start from the prompt."""
        self.mask_logits = None
        return self.masks.start(prompt_ids) if self.use_esp else None

    def observe_prefill(self, probe_logits: torch.Tensor | None, root: int, root_logits: torch.Tensor) -> None:
        if self.use_esp:
            self.mask_logits = probe_logits  # (k, V): mask j proposes depth j under the first root
            self.masks.update([root])

    def rates(self) -> torch.Tensor:
        """P(child accepted | parent accepted) per bucket: decayed counts with a prior (or the prior alone)."""
        if not self.adaptive:
            return self.prior.clone()
        w = self.prior_weight
        return (self.accepted + w * self.prior) / (self.offered + w)

    # ------------------------------------------------------------------ proposal
    def propose(self, tokens: list[int]) -> Block:
        # 1. the sources: context continuations, the masks' top candidates, the current rates
        chains = self._chains(tokens) if "ngram" in self.sources else None
        esp_top = None
        if self.use_esp and self.mask_logits is not None:
            esp_top = torch.topk(self.mask_logits, self.esp_width, dim=-1).indices.to(self.device)
        # 2. every candidate node, grown level by level, scored by the product of the rates on its path
        nodes = self._grow(tokens[-1], self.rates(), chains, esp_top)
        # 3. the tree: the n best nodes (prefix-closed), in candidate order = BFS order
        keep = nodes.score.topk(self._tree_size(nodes.score)).indices.sort().values
        row = torch.full((nodes.tok.shape[0],), -1, dtype=torch.long, device=self.device)
        row[keep] = torch.arange(keep.shape[0], device=self.device)
        parent = nodes.parent[keep]
        parents = torch.where(parent >= 0, row[parent.clamp(min=0)], parent)
        depth, score = nodes.depth[keep], nodes.score[keep]
        layout = Layout(depth, tree_masks(parents, depth))
        # 4. masks on the nodes most likely to be the deepest accepted one
        owners, embeds = None, None
        if self.mask_rows:
            owners = self._mask_owners(score, parents)
            layout = with_masks(layout.allowed, depth, owners, self.k)
            embeds = self.masks.rows(owners.shape[0])
        self.draft = Draft(nodes.member[keep], parents, float(score[1:].sum()), owners)
        return Block(nodes.tok[keep], parents.tolist(), layout, embeds)

    def _chains(self, tokens: list[int]) -> torch.Tensor:
        """(M, ngram_depth) continuations of the context's n-gram matches, -1 padded (M <= ngram_chains)."""
        chains = []
        for draft in copy_matches(tokens, self.max_ngram_size, self.ngram_depth, truncated=True):
            if draft not in chains:
                chains.append(draft)
                if len(chains) == self.ngram_chains:
                    break
        out = torch.full((len(chains), self.ngram_depth), -1, dtype=torch.long)
        for i, c in enumerate(chains):
            out[i, : len(c)] = torch.tensor(c)
        return out.to(self.device)

    def _grow(self, root: int, rate: torch.Tensor, chains: torch.Tensor | None, esp_top: torch.Tensor | None) -> Nodes:
        """Every candidate node, level by level: the children of the frontier from every source, one node
        per distinct token under a parent, and the level's (n_tree - 1) best. Stops when no source has a
        child, or when the level's best scores below the n_tree-th best so far (nothing deeper can enter)."""
        dev, n_max = self.device, self.n_tree
        n_chains = chains.shape[0] if chains is not None else 0
        tok = torch.tensor([root], device=dev)
        score = torch.ones(1, device=dev)  # the frontier's scores
        idx = torch.zeros(1, dtype=torch.long, device=dev)  # the frontier's candidate indices
        on_chain = torch.ones(1, n_chains, dtype=torch.bool, device=dev)  # which continuations each node follows
        # the root scores 2, above every child: it is always kept
        levels = [Nodes(tok, score * 2, torch.full((1,), -1, device=dev), idx,
                        torch.zeros(1, self.prior.shape[0], dtype=torch.bool, device=dev))]
        n_cand = 1
        for d in range(1, self.max_depth + 1):
            cands = self._candidates(tok, on_chain, d, chains, esp_top, rate)
            if cands is None:
                break
            C, R, B = cands
            child, eq = self._merge_duplicates(C, R, score)
            n_keep = min(n_max - 1, int((child > 0).sum()))
            if n_keep == 0:
                break
            top, flat = child.flatten().topk(n_keep)
            pf, col = flat // C.shape[1], flat % C.shape[1]
            member = (eq[pf, col].float() @ self._onehot[B]) > 0  # (n_keep, buckets): sources that proposed it
            new_tok = C[pf, col]
            if chains is not None and d <= self.ngram_depth:
                on_chain = on_chain[pf] & (chains[:, d - 1][None] == new_tok[:, None])
            else:
                on_chain = torch.zeros(n_keep, n_chains, dtype=torch.bool, device=dev)
            tok, score, parent = new_tok, top, idx[pf]
            idx = torch.arange(n_cand, n_cand + n_keep, device=dev)
            n_cand += n_keep
            levels.append(Nodes(tok, score, parent, torch.full((n_keep,), d, device=dev), member))
            scores = torch.cat([lv.score for lv in levels])
            if n_cand >= n_max and top[0] <= scores.topk(n_max).values[-1]:
                break  # deeper nodes score below this level's best: none can enter the top n_max
        return Nodes.cat(levels)

    def _candidates(self, tok, on_chain, d, chains, esp_top, rate):
        """Children of the frontier (F nodes): tokens (F, S), rates (F, S), bucket per column (S,); None
        when no source has any."""
        F = tok.shape[0]
        toks, rates, buckets = [], [], []
        if "recycling" in self.sources:
            toks.append(self.adj[tok])
            rates.append(rate[:SUCCESSORS].expand(F, -1) * self.adj_filled[tok][:, None])
            buckets.append(torch.arange(SUCCESSORS, device=self.device))
        if chains is not None and d <= self.ngram_depth and chains.shape[0]:
            nxt = chains[:, d - 1]
            toks.append(nxt.expand(F, -1))
            rates.append(rate[self.b_ngram + d - 1] * (on_chain & (nxt >= 0)[None]))
            buckets.append(torch.full_like(nxt, self.b_ngram + d - 1))
        if esp_top is not None and d <= self.k:
            cols = self.b_esp + (d - 1) * self.esp_width + torch.arange(self.esp_width, device=self.device)
            t = esp_top[d - 1].expand(F, -1)
            toks.append(t)
            rates.append(rate[cols].expand(F, -1) * (t != tok[:, None]))  # ESP's pruner: not the parent's token
            buckets.append(cols)
        if not toks:
            return None
        return torch.cat(toks, 1), torch.cat(rates, 1).clamp(0, MAX_RATE), torch.cat(buckets)

    def _merge_duplicates(self, C: torch.Tensor, R: torch.Tensor, score: torch.Tensor):
        """Child scores (F, S) with one node per distinct token under a parent (its first column; the
        others score 0), rate 1 - Π(1 - a_i) over the sources proposing it; and the equality mask
        (F, S, S) of the columns that carry the same token."""
        valid = R > 0
        eq = (C[:, :, None] == C[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        first = ~(eq & self._later[: eq.shape[1], : eq.shape[1]]).any(1)  # no equal token in an earlier column
        comb = 1 - torch.exp(torch.einsum("fji,fi->fj", eq.float(), torch.log1p(-R)))
        return score[:, None] * comb * (first & valid), eq

    def _tree_size(self, scores: torch.Tensor) -> int:
        """Nodes to keep: the whole budget (size=full), or the n that maximises expected tokens per second
        of forward (size=cost; expected tokens = 1 + c Σ scores of the drafts, c the recent calibration)."""
        n = min(self.n_tree, scores.shape[0])
        if self.size == "cost":
            best = scores.topk(n).values[1:]
            m = torch.arange(n, device=self.device)
            rows = m + 1 + torch.clamp(m + 1, max=self.mask_rows) * self.k
            c = (self.drafts_accepted + 1) / (self.drafts_expected + 1)  # calibration: accepted / Σ scores, recently
            gain = torch.cat([torch.ones(1, device=self.device), 1 + c * best.cumsum(0)]) / self.t_of[rows.clamp(max=self.bc)]
            n = int(gain.argmax()) + 1
        return n

    def _mask_owners(self, score: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """The mask_rows tree rows most likely to be the deepest accepted one: P(reach b) minus Σ P(reach
        a child of b), in row order."""
        p = score.clone()
        p[0] = 1.0
        below = torch.zeros_like(p).index_add_(0, parents[1:], p[1:])
        return (p - below).topk(min(self.mask_rows, p.shape[0])).indices.sort().values

    # ------------------------------------------------------------------ after the forward
    def observe(self, step: Step) -> None:
        """The successor matrix from every tree row, the acceptance counts of each bucket, and the masks:
        their next logits (if the deepest accepted row carried masks) and their update."""
        block, draft = step.block, self.draft
        recycle(self.adj, step)
        self.adj_filled[block.ids[: block.n_tree].to(self.device)] = True
        # acceptance counts: a node was offered when its parent was accepted
        on_path = torch.zeros(block.n_tree, dtype=torch.bool, device=self.device)
        on_path[torch.tensor(step.path, device=self.device)] = True
        member = draft.member[1:].float()
        self.offered.mul_(self.decay).add_((member * on_path[draft.parents[1:]][:, None]).sum(0))
        self.accepted.mul_(self.decay).add_((member * on_path[1:][:, None]).sum(0))
        self.drafts_expected = self.decay * self.drafts_expected + draft.expected
        self.drafts_accepted = self.decay * self.drafts_accepted + len(step.path) - 1
        if self.use_esp:
            b = step.path[-1]
            hit = (draft.owners == b).nonzero().flatten()
            if hit.numel():
                first = block.n_tree + int(hit[0]) * self.k
                self.mask_logits = step.logits[first : first + self.k]
            else:
                self.mask_logits = None
            self.masks.update(step.committed)
