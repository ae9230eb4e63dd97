"""The one decode loop every method runs on, and the drafter contract.

A generation: `drafter.start(prompt)` (per-generation reset; optional probe rows for the prefill), the
prefill forward and its first token (`drafter.observe_prefill`), then steps until EOS or the token budget.
A step: the drafter proposes a `Block` = root (last committed token, not yet cached) + a token tree
(parent pointers) + optional probe rows, with its `Layout` (positions, block-local attention); one
forward with explicit positions and a 4-D additive mask; verification by the `walk` down the tree
(greedy, or sample matching / rejection at T > 0); the bonus token; KV compaction to prefix + accepted
path; `drafter.observe(step)`. All counters live here and nowhere else. This is speculative decoding's
verification (Leviathan et al., 2023; Chen et al., 2023) with a token tree (SpecInfer, Miao et al., 2024):
the committed tokens are exactly what greedy decoding (or sampling at the temperature) would produce.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from mtp.kv import keep_rows, layer_masks, new_cache, with_cache


@dataclass(eq=False)
class Layout:
    """Positions and block-local attention of a block's rows; unpacks as `depth, allowed`.

    depth:   (T,) long    position of each row minus the root's position
    allowed: (T, T) bool  allowed[i, j]: row i attends to row j (the block-local part of the mask; every
                          row always sees the whole cache)
    static:  the drafter builds this layout once and hands it out at many steps. The loop then converts
             it to its additive attention mask once and keeps the result on the layout; a layout that is
             not static is converted at every step it is used.
    """

    depth: torch.Tensor
    allowed: torch.Tensor
    static: bool = False
    _additive: torch.Tensor | None = field(default=None, repr=False)

    def __iter__(self):
        return iter((self.depth, self.allowed))

    def additive(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(T, T): 0 where a row may attend, the dtype's minimum elsewhere (kept when static)."""
        add = self._additive
        if add is None or add.dtype != dtype or add.device != device:
            add = torch.full(self.allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=device)
            add.masked_fill_(self.allowed.to(device), 0.0)
            if self.static:
                self._additive = add
        return add


@dataclass
class Draws:
    """The children of one tree row when a drafter draws them at random (T > 0): `tokens`, every draw in
    draw order, without replacement from the distribution q (`q_ids`, `q_probs`). A draw the tree carries
    no row for is still listed: the verifier tests every draw in order, and a draw accepted without a row
    is committed as that node's token with nothing below it."""

    q_ids: list[int]
    q_probs: list[float]
    tokens: list[int]


@dataclass
class Block:
    """One step's input rows: `ids` (tree rows, root first, then token probe rows), then `embeds`.

    ids:     (n_ids,) long   tree rows 0..n_tree-1 (row 0 = root), then probe rows given as tokens
    parents: list[int]       (n_tree,) parent row of each tree row, -1 for the root, parents[i] < i
    layout:  Layout          depth and block-local attention of all T rows (static when built once)
    embeds:  (P, H) or None   probe rows given as input embeddings (ESP's masks), after the id rows
    draws:   {row: Draws} or None   for T > 0: tree rows whose children were drawn at random from a
                              distribution q (STAND's Gumbel-Top-K); they are verified by recursive rejection
                              sampling over the draws instead of by matching
    """

    ids: torch.Tensor
    parents: list[int]
    layout: Layout
    embeds: torch.Tensor | None = None
    draws: dict[int, Draws] | None = None

    @property
    def depth(self) -> torch.Tensor:
        return self.layout.depth

    @property
    def allowed(self) -> torch.Tensor:
        return self.layout.allowed

    @property
    def n_tree(self) -> int:
        return len(self.parents)

    @property
    def size(self) -> int:
        return self.depth.shape[0]


@dataclass
class Step:
    """What the drafter observes after a verified forward."""

    block: Block
    logits: torch.Tensor  # (T, V) float, one row per block row
    path: list[int]  # accepted tree rows, root first
    committed: list[int]  # tokens committed this step: accepted drafts + bonus (after any stop truncation)


class Drafter:
    """The drafter contract. The base class is autoregressive decoding: it proposes nothing."""

    name = "ar"
    min_bc = 1  # smallest block complexity (tokens per forward) the method can run at
    # True when, at T > 0, the drafts themselves are random draws (STAND's Gumbel-Top-K, `Block.draws`):
    # the verifier then consumes other random numbers than AR, so the sampled ids differ from AR's while
    # their distribution is the target's. Such a method is lossless in distribution, not in ids.
    random_drafts = False

    def setup(self, model) -> None:
        """Once per job, before any prompt (job-level state such as Token Recycling's matrix)."""

    def start(self, prompt_ids: list[int]) -> torch.Tensor | None:
        """Once per generation, before the prefill: reset per-generation state, and return probe rows
        (P, H) to append to the prefill forward (ESP's masks), or None."""
        return None

    def observe_prefill(self, probe_logits: torch.Tensor | None, root: int, root_logits: torch.Tensor) -> None:
        """The prefill's probe-row logits (P, V), the first generated token (the first root) and the logit
        row (V,) it came from (the prompt's last position; LogitSpec drafts from it)."""

    def propose(self, tokens: list[int]) -> Block:
        """A block rooted at tokens[-1] (prompt + committed so far; the root is not cached yet)."""
        return chain_block(tokens[-1:])

    def observe(self, step: Step) -> None:
        """The verified step, to build the next proposal."""


# --------------------------------------------------------------------------- block helpers
def tree_layout(parents: list[int], static: bool = False) -> Layout:
    """depth (n,) and ancestor-or-self attention (n, n) of a tree given by parent pointers."""
    n = len(parents)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i, p in enumerate(parents):
        if p >= 0:
            assert p < i, "parents must precede children"
            allowed[i] = allowed[p]
            depth[i] = depth[p] + 1
        allowed[i, i] = True
    return Layout(depth, allowed, static)


def tree_block(ids: list[int], parents: list[int]) -> Block:
    return Block(torch.tensor(ids, dtype=torch.long), list(parents), tree_layout(parents))


def chain_block(ids: list[int]) -> Block:
    """A chain root -> ids[1] -> ids[2] ... (the first id is the root)."""
    return tree_block(ids, list(range(-1, len(ids) - 1)))


def walk(ids: list[int], parents: list[int], choose) -> tuple[list[int], list[int]]:
    """The verifier's walk down a token tree (rows `ids`, parent pointers `parents`) from the root.

    At each node, `choose(node, children rows)` returns (the accepted child row or None, the token
    committed at that node). The walk commits the token and goes on from the accepted child; it ends at
    the first node with no accepted child, whose token is the bonus. Returns (accepted path of rows, root
    first; committed tokens)."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents[1:], start=1):
        children.setdefault(p, []).append(i)
    node, path, committed = 0, [0], []
    while True:
        nxt, y = choose(node, children.get(node, []))
        committed.append(y)
        if nxt is None:
            return path, committed
        node = nxt
        path.append(node)


# --------------------------------------------------------------------------- the loop
@dataclass
class Generation:
    """One generation's output and counters (prefill's first token not counted in τ)."""

    prompt_ids: list[int]
    new_ids: list[int]
    stop: str  # "eos" | "max_new_tokens" | "context_limit"
    prefill_calls: int = 0
    decode_calls: int = 0
    committed_per_step: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)  # drafts accepted (before EOS/budget truncation)
    leaf_per_step: list[bool] = field(default_factory=list)  # the deepest accepted node had no child in the tree
    tokens_fed_max: int = 0
    tokens_fed_sum: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0  # of wall_s: the prefill forward and the first token
    forward_s: float = 0.0  # of wall_s: the model calls of the decode steps (the rest is the loop's own cost)

    @property
    def accept_hist(self) -> dict[int, int]:
        return dict(sorted(Counter(self.committed_per_step).items()))

    @property
    def accepted_hist(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_per_step).items()))

    @property
    def leaf_hist(self) -> dict[int, int]:
        return dict(sorted(Counter(a for a, leaf in zip(self.accepted_per_step, self.leaf_per_step) if leaf).items()))

    @property
    def tokens_fed_mean(self) -> float:
        return self.tokens_fed_sum / self.decode_calls if self.decode_calls else 0.0


class Decoder:
    """Runs `drafter` on `model` for one prompt at a time; holds per-model constants only."""

    def __init__(self, model, eos_ids, temperature: float = 0.0, seed: int = 0):
        self.model = model
        self.embed = model.get_input_embeddings()
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.eos = set(int(e) for e in ([eos_ids] if isinstance(eos_ids, int) else eos_ids))
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.temperature, self.seed = temperature, seed
        self.generator = torch.Generator(device=self.device)

    def _sync(self):
        sync(self.device)

    @torch.inference_mode()
    def generate(self, drafter: Drafter, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        self._sync()
        t0 = time.perf_counter()
        gen = Generation(list(prompt_ids), [], stop="max_new_tokens")
        # reseeded per generation: a method and AR draw the same samples in the same order, so at T > 0
        # a lossless method reproduces AR's sampled ids exactly (and hence AR's distribution)
        self.generator.manual_seed(self.seed)
        cache = new_cache(self.model.config, len(prompt_ids) + max_new_tokens + 256)  # grows if a block needs more

        # 1. prefill: prompt (+ the drafter's probe rows, whose KV is dropped afterwards)
        t = len(prompt_ids)
        if not 0 < t <= self.max_positions:
            raise ValueError(f"a prompt of {t} tokens does not fit: the model takes 1 to {self.max_positions} positions")
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        probes = drafter.start(prompt_ids)
        if probes is None:
            out = self.model(input_ids=ids, **with_cache(self.model, cache))
        else:  # causal over [prompt | probes], positions 0..t+P-1
            embeds = torch.cat([self.embed(ids)[0], probes.to(self.dtype)])[None]
            out = self.model(inputs_embeds=embeds, **with_cache(self.model, cache))
            keep_rows(cache, t, [])
        gen.prefill_calls = 1
        self._sync()
        gen.prefill_s = time.perf_counter() - t0
        logits = out.logits[0].float()
        root = self._pick(logits[t - 1])
        drafter.observe_prefill(logits[t:] if probes is not None else None, root, logits[t - 1])
        tokens = list(prompt_ids) + [root]
        gen.new_ids.append(root)
        if root in self.eos:
            gen.stop = "eos"

        drafting = True  # until the context is too full for the drafter's blocks
        while gen.stop == "max_new_tokens" and len(gen.new_ids) < max_new_tokens:
            cache_len = cache.get_seq_length()
            if cache_len + 1 > self.max_positions:  # not even the root fits: the same point for every method
                gen.stop = "context_limit"
                break
            # 2. propose; near the end of the context a block that does not fit is replaced by plain AR
            # steps to the end, so every method stops at exactly AR's length
            block = drafter.propose(tokens) if drafting else None
            if block is not None and cache_len + int(block.depth.max()) + 1 > self.max_positions:
                drafting, block = False, None
            if block is None:
                block = chain_block([tokens[-1]])
            # 3. one forward of the whole block
            logits, seconds = self._forward(block, cache, cache_len)
            gen.forward_s += seconds
            gen.decode_calls += 1
            gen.tokens_fed_max = max(gen.tokens_fed_max, block.size)
            gen.tokens_fed_sum += block.size
            # 4. verify: walk the tree from the root, commit accepted drafts + the bonus token
            path, committed = self._verify(block, logits)
            gen.accepted_per_step.append(len(path) - 1)
            gen.leaf_per_step.append(path[-1] not in block.parents)
            committed = committed[: max_new_tokens - len(gen.new_ids)]
            for i, tok in enumerate(committed):
                if tok in self.eos:
                    committed = committed[: i + 1]
                    gen.stop = "eos"
                    break
            gen.committed_per_step.append(len(committed))
            gen.new_ids += committed
            tokens += committed
            if gen.stop != "max_new_tokens" or len(gen.new_ids) >= max_new_tokens:
                break
            # 5. drop rejected and probe KV rows: keep prefix + root + accepted path, in order
            keep_rows(cache, cache_len, path)
            # 6. the drafter observes the forward
            if drafting:
                drafter.observe(Step(block, logits, path, committed))
        self._sync()
        gen.wall_s = time.perf_counter() - t0
        return gen

    def _forward(self, block: Block, cache, cache_len: int) -> tuple[torch.Tensor, float]:
        """One forward of `block` on top of `cache`: logits (T, V) in fp32, and the model call's seconds."""
        T = block.size
        local = block.layout.additive(self.dtype, self.device)  # converted once for a static layout
        mask = torch.cat([torch.zeros(T, cache_len, dtype=self.dtype, device=self.device), local], dim=1)
        position_ids = (block.depth.to(self.device) + cache_len)[None]
        masks = layer_masks(self.model.config, mask[None, None], position_ids[0], cache_len)
        ids = block.ids.to(self.device)
        if block.embeds is None:
            kw = {"input_ids": ids[None]}
        else:
            kw = {"inputs_embeds": torch.cat([self.embed(ids), block.embeds.to(self.dtype)])[None]}
        self._sync()
        t0 = time.perf_counter()
        out = self.model(**kw, attention_mask=masks, position_ids=position_ids, **with_cache(self.model, cache))
        logits = out.logits[0].float()
        self._sync()
        return logits, time.perf_counter() - t0

    def _pick(self, logits_row: torch.Tensor) -> int:
        """Greedy argmax, or a sample at the decoder's temperature."""
        if self.temperature <= 0:
            return int(logits_row.argmax())
        probs = torch.softmax(logits_row / self.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _verify(self, block: Block, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Accepted path (tree rows, root first) and committed tokens (accepted drafts + bonus).

        At each node y = argmax (or a sample of p_target at T > 0); the child carrying y is accepted.
        For deterministic drafts this is exactly greedy / exactly the target distribution. Children
        drawn from a distribution q (block.draws) are verified by recursive rejection at T > 0.
        """
        n = block.n_tree
        ids = block.ids[:n].tolist()
        greedy = logits[:n].argmax(-1).tolist() if self.temperature <= 0 else None
        return walk(ids, block.parents, lambda node, kids: self._choose(block, logits, ids, greedy, node, kids))

    def _choose(self, block, logits, ids, greedy, node: int, kids: list[int]) -> tuple[int | None, int]:
        """At tree row `node` with children `kids`: the accepted child (or None) and the committed token."""
        if greedy is None and block.draws and node in block.draws:
            return self._reject_sample(logits[node], block.draws[node], [(c, ids[c]) for c in kids])
        y = greedy[node] if greedy is not None else self._pick(logits[node])
        return next((c for c in kids if ids[c] == y), None), y

    def _reject_sample(self, logits_row, draws: Draws, kids: list[tuple[int, int]]) -> tuple[int | None, int]:
        """Recursive rejection sampling over the draws, in draw order (SpecInfer, Miao et al., 2024; the
        multi-draft rule of speculative sampling): draw x_i is accepted with prob min(1, r(x_i) / q_i(x_i)),
        q_i = q without the earlier draws, renormalised; on rejection r <- norm(max(r - q_i, 0)). All
        rejected: y ~ r. The returned token is distributed exactly as p (the target at this node), whichever
        draws the tree carries rows for; the accepted child row is the one carrying y (None if none)."""
        row_of = {tok: row for row, tok in kids}
        r = torch.softmax(logits_row / self.temperature, dim=-1)  # p: target, then the residual
        q = torch.zeros_like(r)
        q[torch.tensor(draws.q_ids, device=r.device)] = torch.tensor(draws.q_probs, dtype=r.dtype, device=r.device)
        for tok in draws.tokens:
            qi = q / q.sum()
            if qi[tok] <= 0:  # not a draw from q: cannot be verified by rejection; skip it
                continue
            u = torch.rand((), generator=self.generator, device=r.device)
            if u * qi[tok] < r[tok]:  # u < r/q_i
                return row_of.get(tok), tok
            resid = torch.clamp(r - qi, min=0)
            if resid.sum() > 0:
                r = resid / resid.sum()
            q[tok] = 0
            if q.sum() <= 0:
                break
        y = int(torch.multinomial(r, 1, generator=self.generator))
        return row_of.get(y), y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward_s(model, cache_len: int, n_tokens: int, repeats: int, grad_mode=torch.inference_mode) -> float:
    """Median seconds of one model forward of `n_tokens` (a chain, causal) on a `cache_len`-token cache
    of the decode loop's kind (random tokens; after one untimed warm-up forward)."""
    with grad_mode():
        device = next(model.parameters()).device
        dtype = model.get_input_embeddings().weight.dtype
        g = torch.Generator().manual_seed(0)
        V = model.config.vocab_size
        cache = new_cache(model.config, cache_len + n_tokens)
        model(input_ids=torch.randint(0, V, (1, cache_len), generator=g).to(device), **with_cache(model, cache))
        ids = torch.randint(0, V, (1, n_tokens), generator=g).to(device)
        local = torch.full((n_tokens, n_tokens), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
        mask = torch.cat([torch.zeros(n_tokens, cache_len, dtype=dtype, device=device), local], 1)[None, None]
        pos = torch.arange(cache_len, cache_len + n_tokens, device=device)[None]
        masks = layer_masks(model.config, mask, pos[0], cache_len)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=masks, position_ids=pos, **with_cache(model, cache))
            sync(device)
            times.append(time.perf_counter() - t0)
            keep_rows(cache, cache_len, [])  # back to the cache length
        return statistics.median(times[1:])
