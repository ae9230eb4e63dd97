"""ESP+ — one block budget, three training-free sources, one merged tree (README: "ESP+").

Candidate children of a tree node carrying token t at depth d come from:
  recycling  adj[t, r], r < 8: the model's top-8 after t when t was last in a block (Token Recycling's
             successor matrix, kept across the job's prompts)
  ngram      copies of the context: the continuations of earlier occurrences of the text's last n tokens
             (n = max_ngram_size .. 1), followed down the tree as long as the tree matches them
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

import numpy
import torch

from baselines.pld import PromptLookup
from baselines.recycling import RANK_PRIOR, TOPK, recycle
from mtp.errors import ConfigError
from mtp.esp import ESP
from mtp.loop import Block, Step, bare_forward_s

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


def with_masks(allowed: torch.Tensor, depth: torch.Tensor, owners: torch.Tensor, k: int):
    """depth (T,) and attention (T, T) of a tree plus k mask rows for each owner node (after the tree
    rows, owner by owner): mask j of b sits at depth(b) + j and sees b's ancestors, b, and b's masks 1..j."""
    n, q = allowed.shape[0], owners.shape[0]
    T = n + q * k
    full = torch.zeros(T, T, dtype=torch.bool, device=allowed.device)
    full[:n, :n] = allowed
    full[n:, :n] = allowed[owners].repeat_interleave(k, dim=0)
    if q:
        full[n:, n:] = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool, device=allowed.device).tril()] * q)
    j = torch.arange(1, k + 1, device=depth.device).repeat(q)
    return torch.cat([depth, depth[owners].repeat_interleave(k) + j]), full


class ESPPlus(ESP):
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
        init: str = "mean",
        lam: float = 0.1,
        ema: str = "token",
        momentum: float = 0.0,
        depth_lam: bool = False,
        init_window: int = 16,
        ood_sigmas: float = 5.0,
        variant: str = "full",  # a label for ablations; no effect
        family: str | None = None,
        seed: int = 0,
    ):
        unknown = set(sources) - set(SOURCES)
        if unknown or not sources:
            raise ConfigError(f"method.sources={list(sources)}: expected a non-empty subset of {list(SOURCES)}")
        if min(k, esp_width, ngram_chains, ngram_depth, max_depth) < 1 or mask_rows < 0:
            raise ConfigError("method.k, esp_width, ngram_chains, ngram_depth, max_depth must be >= 1, mask_rows >= 0")
        if size not in ("full", "cost"):
            raise ConfigError(f"method.size={size!r}: expected full or cost")
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
        self.ngram_chains, self.ngram_depth = ngram_chains, min(ngram_depth, max_depth)
        self.lookup = PromptLookup(bc=self.ngram_depth + 1, max_ngram_size=max_ngram_size,
                                   num_pred_tokens=self.ngram_depth, truncated=True)
        # ESP's mask state (ESP.prefill_probes / _update_masks read these)
        self.init, self.lam, self.ema, self.momentum, self.depth_lam = init, lam, ema, momentum, depth_lam
        self.init_window, self.ood_sigmas, self.seed = init_window, ood_sigmas, seed
        # rate buckets: recycling ranks, n-gram depths, ESP (depth, rank)
        self.b_ngram = TOPK
        self.b_esp = TOPK + self.ngram_depth
        n_buckets = self.b_esp + k * esp_width
        prior = torch.zeros(n_buckets)
        prior[:TOPK] = torch.tensor(RANK_PRIOR)
        prior[self.b_ngram : self.b_esp] = 0.5
        prior[self.b_esp :] = (0.2 / torch.arange(1, esp_width + 1)).repeat(k)
        self.prior = prior

    # ------------------------------------------------------------------ state
    def setup(self, model) -> None:
        super().setup(model)  # the embedding table, for the masks
        self.device = self.table.device
        V = self.table.shape[0]
        self.adj = torch.zeros(V, TOPK, dtype=torch.long, device=self.device)
        self.adj_filled = torch.zeros(V, dtype=torch.bool, device=self.device)
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
        width = TOPK + self.ngram_chains + self.esp_width  # most candidate columns per node
        self._later = torch.ones(width, width, dtype=torch.bool, device=self.device).triu(1)

    def prefill_probes(self, prompt_ids: list[int]) -> torch.Tensor | None:
        self.mask_logits = None
        return super().prefill_probes(prompt_ids) if self.use_esp else None

    def observe_prefill(self, probe_logits: torch.Tensor | None, root: int) -> None:
        if self.use_esp:
            super().observe_prefill(probe_logits, root)

    def rates(self) -> torch.Tensor:
        if not self.adaptive:
            return self.prior.clone()
        w = self.prior_weight
        return (self.accepted + w * self.prior) / (self.offered + w)

    # ------------------------------------------------------------------ proposal
    def _chains(self, tokens: list[int]) -> torch.Tensor:
        """(M, ngram_depth) continuations of the context's n-gram matches, -1 padded (M <= ngram_chains)."""
        chains = []
        for draft in self.lookup.matches(tokens):
            if draft not in chains:
                chains.append(draft)
                if len(chains) == self.ngram_chains:
                    break
        out = torch.full((len(chains), self.ngram_depth), -1, dtype=torch.long)
        for i, c in enumerate(chains):
            out[i, : len(c)] = torch.tensor(c)
        return out.to(self.device)

    def _candidates(self, tok, on_chain, d, chains, esp_top, rate):
        """Children of the frontier (F nodes): tokens (F, S), rates (F, S), bucket per column (S,); None
        when no source has any."""
        F = tok.shape[0]
        toks, rates, buckets = [], [], []
        if "recycling" in self.sources:
            toks.append(self.adj[tok])
            rates.append(rate[:TOPK].expand(F, -1) * self.adj_filled[tok][:, None])
            buckets.append(torch.arange(TOPK, device=self.device))
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

    def propose(self, tokens: list[int]) -> Block:
        dev, n_max = self.device, self.n_tree
        rate = self.rates()
        chains = self._chains(tokens) if "ngram" in self.sources else None
        esp_top = None
        if self.use_esp and self.mask_logits is not None:
            esp_top = torch.topk(self.mask_logits, self.esp_width, dim=-1).indices.to(dev)
        onehot = self._onehot
        # level 0: the root
        tok = torch.tensor([tokens[-1]], device=dev)
        score = torch.ones(1, device=dev)
        idx = torch.zeros(1, dtype=torch.long, device=dev)
        on_chain = torch.ones(1, chains.shape[0] if chains is not None else 0, dtype=torch.bool, device=dev)
        all_tok, all_score, all_parent, all_depth = [tok], [score * 2], [torch.full((1,), -1, device=dev)], [idx]
        all_member = [torch.zeros(1, self.prior.shape[0], dtype=torch.bool, device=dev)]
        n_cand = 1
        for d in range(1, self.max_depth + 1):
            cands = self._candidates(tok, on_chain, d, chains, esp_top, rate)
            if cands is None:
                break
            C, R, B = cands
            valid = R > 0
            # one node per distinct token under the same parent: rates combined, buckets merged
            eq = (C[:, :, None] == C[:, None, :]) & valid[:, :, None] & valid[:, None, :]
            first = ~(eq & self._later[: eq.shape[1], : eq.shape[1]]).any(1)  # no equal token in an earlier column
            comb = 1 - torch.exp(torch.einsum("fji,fi->fj", eq.float(), torch.log1p(-R)))
            child = score[:, None] * comb * (first & valid)
            n_keep = min(n_max - 1, int((child > 0).sum()))
            if n_keep == 0:
                break
            top, flat = child.flatten().topk(n_keep)
            pf, col = flat // C.shape[1], flat % C.shape[1]
            member = (eq[pf, col].float() @ onehot[B]) > 0  # (n_keep, buckets): sources that proposed it
            new_tok = C[pf, col]
            if chains is not None and d <= self.ngram_depth:
                on_chain = on_chain[pf] & (chains[:, d - 1][None] == new_tok[:, None])
            else:
                on_chain = torch.zeros(n_keep, on_chain.shape[1], dtype=torch.bool, device=dev)
            tok, score, parent = new_tok, top, idx[pf]
            idx = torch.arange(n_cand, n_cand + n_keep, device=dev)
            n_cand += n_keep
            all_tok.append(tok), all_score.append(score), all_parent.append(parent), all_member.append(member)
            all_depth.append(torch.full((n_keep,), d, device=dev))
            scores = torch.cat(all_score)
            if n_cand >= n_max and top[0] <= scores.topk(n_max).values[-1]:
                break  # deeper nodes score below this level's best: none can enter the top n_max
        # the tree: the n best (prefix-closed), in candidate order = BFS order
        scores = torch.cat(all_score)
        n = min(n_max, n_cand)
        if self.size == "cost":  # expected tokens per step (1 + c Σ scores of the drafts) per second of forward
            best = scores.topk(n).values[1:]
            m = torch.arange(n, device=dev)
            rows = m + 1 + torch.clamp(m + 1, max=self.mask_rows) * self.k
            c = (self.drafts_accepted + 1) / (self.drafts_expected + 1)  # calibration: accepted / Σ scores, recently
            gain = torch.cat([torch.ones(1, device=dev), 1 + c * best.cumsum(0)]) / self.t_of[rows.clamp(max=self.bc)]
            n = int(gain.argmax()) + 1
        keep = scores.topk(n).indices.sort().values
        row = torch.full((n_cand,), -1, dtype=torch.long, device=dev)
        row[keep] = torch.arange(keep.shape[0], device=dev)
        parent = torch.cat(all_parent)[keep]
        parents = torch.where(parent >= 0, row[parent.clamp(min=0)], parent)
        depth = torch.cat(all_depth)[keep]
        ids = torch.cat(all_tok)[keep]
        allowed = tree_masks(parents, depth)
        self._member = torch.cat(all_member)[keep]
        self._expected = float(scores[keep][1:].sum())
        self._parents = parents
        embeds = None
        if self.mask_rows:  # masks on the nodes most likely to be the deepest accepted one
            p = scores[keep].clone()
            p[0] = 1.0
            below = torch.zeros_like(p).index_add_(0, parents[1:], p[1:])
            self._owners = (p - below).topk(min(self.mask_rows, p.shape[0])).indices.sort().values
            depth, allowed = with_masks(allowed, depth, self._owners, self.k)
            embeds = self.masks.to(self.table.dtype).repeat(self._owners.shape[0], 1)
        return Block(ids, parents.tolist(), depth, allowed, embeds)

    # ------------------------------------------------------------------ after the forward
    def observe(self, step: Step) -> None:
        block = step.block
        recycle(self.adj, step)
        self.adj_filled[block.ids[: block.n_tree].to(self.device)] = True
        # acceptance counts: a node was offered when its parent was accepted
        on_path = torch.zeros(block.n_tree, dtype=torch.bool, device=self.device)
        on_path[torch.tensor(step.path, device=self.device)] = True
        member = self._member[1:].float()
        self.offered.mul_(self.decay).add_((member * on_path[self._parents[1:]][:, None]).sum(0))
        self.accepted.mul_(self.decay).add_((member * on_path[1:][:, None]).sum(0))
        self.drafts_expected = self.decay * self.drafts_expected + self._expected
        self.drafts_accepted = self.decay * self.drafts_accepted + len(step.path) - 1
        if self.use_esp:
            b = step.path[-1]
            hit = (self._owners == b).nonzero().flatten()
            if hit.numel():
                first = block.n_tree + int(hit[0]) * self.k
                self.mask_logits = step.logits[first : first + self.k]
            else:
                self.mask_logits = None
            self._update_masks(step.committed)
