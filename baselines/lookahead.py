"""LADE — Lookahead Decoding (Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead
Decoding", ICML 2024; reference code github.com/hao-ai-lab/LookaheadDecoding) as a drafter on the one loop.

State (per generation): a 2-D Jacobi window and an n-gram pool `key token -> LRU list of (N-1)-token
continuations`, at most G per key (most recently used last).

Block per step (T rows, root counted once):
    [root | verification trie | window row 0 | window row 1 | ... | window row f]
- Verification branch = the TREE: the (up to G) pool n-grams keyed by the root, each a chain under the
  root, merged into a trie (shared prefixes once, so no row is fed twice). The loop's greedy walk is
  exactly LADE's "longest matching prefix among candidates", plus the bonus token.
- Lookahead branch = PROBE rows (token ids after the tree rows). The window has C columns; column 0 of
  row 0 is the root itself, so row 0 holds C-1 tokens (columns 1..C-1) and rows 1..f hold C tokens.
  Positions: row 0 column c -> p+c; row l >= 1 column i -> p+l+i (p = root position).
  Attention: column i is its own causal chain [cache, root, row0[1..i], row1[i], ..., row_l[i]]; the
  window never sees the trie and the trie never sees the window (the root is shared).
- Outputs: root logits -> AR token (the loop); trie logits -> verification (the loop); the last row's
  argmax at every column -> the new Jacobi row (observe()).

observe(), once the window is full (f = N-2, C = W):
- pool update (reference order, columns 0..W-1): the key is column i's row-0 token (the root for i = 0,
  the reference's past_tokens[0][i-1] otherwise), the value (row1[i], ..., row_{N-2}[i], new[i]) -- the
  column read top-down is N consecutive positions; LRU insert capped at G per key.
- slide by exactly one column, whatever was committed (the reference's ALWAYS_FWD_ONE=1):
  row0 <- row1[1:], row_l <- row_{l+1}, last <- new. After a step that committed k > 1 tokens the
  window is simply reused one slot later; any choice is lossless (verification is exact), this one is
  the reference code's.
Warm-up (reference): row 0 starts as W+N-3 tokens drawn from the prompt (random.Random(seed), reseeded
per generation), i.e. C = W+N-2 columns. The prefill carries row 0 after the prompt, as the reference's
first forward does (the prompt's last token plays the root: row 0 column c sits at position t - 1 + c, a
causal chain, so the loop's causal [prompt | probe rows] prefill is exactly that layout); its logits give
row 1. The prefill and each of the first N-3 steps drop column 0 of every row and append the new row
(without its column-0 entry): the window is full (fill level N-2: row 0 has W-1 tokens and rows 1..N-2 W
each) from decode step N-2 on, so the fill levels of the decode steps are 1, 2, …, N-2, N-2, … No pool
updates during warm-up.

Tokens per forward = 1 + |trie| + window rows, window rows = (C-1) + f*C at fill level f (C = W+N-2-f):
    1 + window = (f+1)(W+N-2-f)  -> (N-1)W once full;   |trie| <= (N-1)G  (<= (N-2)G, flag off below)
    max = max_{x=1..N-1} x(W+N-1-x) + (N-1)G  ( = (N-1)(W+G) whenever W >= N-2, e.g. every default)
`min_bc` is that max; the constructor refuses a bc below it.

Options and deviations from the reference code (all lossless):
- `full_match_bonus=true` (default): a whole matched n-gram also commits the bonus token (N per step).
  `false` reproduces the reference code's original verification (at most N-1 tokens per step; the
  later lade/decoding.py with `range(len(myguess) + 1)` already commits N): each proposed n-gram
  is truncated to its first N-2 tokens, so a full match commits N-2 drafts + the bonus = N-1 tokens,
  and any shorter match commits exactly what the reference commits. (The N-1-th guess token is then not
  fed at all, so the tree is smaller than the reference's verification branch.)
- `pool_from_prompt=true`: the pool is seeded with the prompt's n-grams (key = token, value = the next
  N-1 tokens) and, as in the reference, the n-gram ending at every committed token is added as well.
- The trie is proposed whenever the pool holds n-grams for the root, also during warm-up (the reference
  only sends guesses once the window is full; this only matters with pool_from_prompt).
- Everything is reset per generation in start(); nothing persists across prompts.

Default (N, W, G) by bc: the paper's fits (3,4,1) -> 10, (4,5,5) -> 30, (5,8,7) -> 60; any other bc takes
the largest entry of CANDIDATES whose full-size block (trie of (N-1)G rows, flag-independent) fits in bc.
Explicit N / W / G replace the corresponding entry of every candidate before that choice; all three
explicit are taken as given (and must fit).
"""

from __future__ import annotations

import random

import torch

from mtp.drafting import trie
from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Layout, Step, tree_layout

PAPER = {10: (3, 4, 1), 30: (4, 5, 5), 60: (5, 8, 7)}
# (N, W, G) in increasing order of max tokens per forward (the number after each); ties keep the first
CANDIDATES = [
    (3, 2, 1),  # 6
    (3, 3, 1),  # 8
    (3, 4, 1),  # 10  paper
    (3, 4, 2),  # 12
    (3, 5, 2),  # 14
    (3, 5, 3),  # 16
    (4, 4, 2),  # 18
    (4, 5, 2),  # 21
    (4, 5, 3),  # 24
    (4, 5, 4),  # 27
    (4, 5, 5),  # 30  paper
    (4, 6, 6),  # 36
    (5, 6, 5),  # 44
    (5, 6, 6),  # 48
    (5, 7, 6),  # 52
    (5, 7, 7),  # 56  Spec-Bench's setting
    (5, 8, 7),  # 60  paper
    (5, 10, 10),  # 80
    (6, 10, 10),  # 100
    (6, 12, 12),  # 120
]


def max_tokens(N: int, W: int, G: int, full_match_bonus: bool = True) -> int:
    """Most tokens one forward can feed: root + window at the fullest warm-up level + a full trie."""
    window = max(x * (W + N - 1 - x) for x in range(1, N))  # root + window at fill level x-1
    return window + (N - 1 if full_match_bonus else N - 2) * G


def fit_params(bc: int, N: int | None = None, W: int | None = None, G: int | None = None) -> tuple[int, int, int]:
    """(N, W, G) for bc: explicit values win; the rest from PAPER / the largest fitting CANDIDATES entry."""
    for key, val, low in (("N", N, 2), ("W", W, 1), ("G", G, 1)):
        if val is not None and (not isinstance(val, int) or val < low):
            raise ConfigError(f"method.{key}={val!r}: Lookahead needs an integer {key} >= {low} (null = fitted to bc)")
    if N is not None and W is not None and G is not None:
        return N, W, G
    if N is None and W is None and G is None and bc in PAPER:
        return PAPER[bc]
    fitted = [(c[0] if N is None else N, c[1] if W is None else W, c[2] if G is None else G) for c in CANDIDATES]
    fitting = [p for p in fitted if max_tokens(*p) <= bc]
    if not fitting:
        fixed = {k: v for k, v in (("N", N), ("W", W), ("G", G)) if v is not None}
        smallest = min(fitted, key=lambda p: max_tokens(*p))
        raise ConfigError(
            f"bc={bc} is too small for Lookahead decoding{' with ' + str(fixed) if fixed else ''}: the smallest fit "
            f"(N, W, G) = {smallest} feeds {max_tokens(*smallest)} tokens per forward "
            f"(max_x x(W+N-1-x) + (N-1)G); raise bc or set method.N/W/G explicitly")
    return max(fitting, key=lambda p: max_tokens(*p))  # the first of equal sizes


def window_layout(C: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """depth and attention of [root | row0 (C-1) | rows 1..f (C each)], local index of (l, col) = l*C + col."""
    L = (f + 1) * C
    depth = torch.zeros(L, dtype=torch.long)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for c in range(C):  # row 0: a causal chain from the root (column 0)
        depth[c] = c
        allowed[c, : c + 1] = True
    for row in range(1, f + 1):
        for i in range(C):
            r = row * C + i
            depth[r] = row + i
            allowed[r, : i + 1] = True  # root + row0 columns 1..i
            allowed[r, [k * C + i for k in range(1, row + 1)]] = True  # rows 1..row of column i
    return depth, allowed


def lru_insert(pool: dict, key: int, value: tuple, cap: int) -> None:
    """The reference's LRU: a present value moves to the end; a full list drops its oldest."""
    lst = pool.setdefault(key, [])
    if value in lst:
        lst.remove(value)
    elif len(lst) >= cap:
        del lst[0]
    lst.append(value)


class Lookahead(Drafter):
    name = "lade"

    def __init__(
        self,
        bc: int,
        N: int | None = None,  # n-gram size: window rows N-1, n-grams of N-1 tokens after a key
        W: int | None = None,  # window width (Jacobi columns)
        G: int | None = None,  # guess set: n-grams kept per key in the pool (= verified per step)
        pool_from_prompt: bool = False,  # seed the pool with the prompt's n-grams (+ the output's)
        full_match_bonus: bool = True,  # false: the reference code's at most N-1 tokens per step
        seed: int = 0,  # initial window: random prompt tokens
    ):
        self.N, self.W, self.G = fit_params(bc, N, W, G)
        self.bc, self.pool_from_prompt, self.full_match_bonus, self.seed = bc, pool_from_prompt, full_match_bonus, seed
        self.min_bc = max_tokens(self.N, self.W, self.G, full_match_bonus)
        if self.min_bc > bc:
            raise ConfigError(
                f"Lookahead (N, W, G) = ({self.N}, {self.W}, {self.G}) feeds up to {self.min_bc} tokens per forward, "
                f"more than bc={bc}")
        self.draft_len = self.N - 1 if full_match_bonus else self.N - 2  # tokens proposed per n-gram
        self.embed = None  # the model's input embeddings (setup): the window's row 0 rides along the prefill
        self._layouts: dict = {}
        self.rows: list[list[int]] = []
        self.pool: dict[int, list[tuple]] = {}

    # ------------------------------------------------------------------ per-generation state
    @property
    def fill(self) -> int:
        """Fill level f: rows 1..f of the window exist (N-2 = full)."""
        return len(self.rows) - 1

    @property
    def cols(self) -> int:
        """Window columns C (column 0 of row 0 is the root)."""
        return len(self.rows[0]) + 1

    def setup(self, model) -> None:
        self.embed = model.get_input_embeddings()

    def start(self, prompt_ids: list[int]) -> torch.Tensor | None:
        """A new window (row 0 from the prompt) and pool; row 0's embeddings, for the prefill to carry
        (none without a model, as in unit tests of the window alone)."""
        rng = random.Random(self.seed)
        self.rows = [[rng.choice(prompt_ids) for _ in range(self.W + self.N - 3)]]
        self.pool = {}
        self.text = list(prompt_ids)
        if self.pool_from_prompt:
            for k in range(self.N - 1, len(self.text)):
                self._add_text_ngram(k)
        if self.embed is None or self.N <= 2:  # N = 2: the window is full at row 0 alone, nothing to warm up
            return None
        return self.embed(torch.tensor(self.rows[0], device=self.embed.weight.device))

    def observe_prefill(self, probe_logits, root: int, root_logits) -> None:
        if probe_logits is not None:  # row 0 rode along the prefill: its argmaxes are row 1 (a warm-up step)
            self._advance([None] + probe_logits.argmax(-1).tolist())
        self._commit([root])

    def _advance(self, new: list[int]) -> None:
        """A warm-up step: every row loses column 0, the new row joins without its column 0."""
        self.rows = [row[1:] for row in self.rows] + [new[1:]]

    def _commit(self, committed: list[int]) -> None:
        for tok in committed:
            self.text.append(tok)
            if self.pool_from_prompt:
                self._add_text_ngram(len(self.text) - 1)

    def _add_text_ngram(self, end: int) -> None:
        """The n-gram of the text ending at index `end`: key text[end-N+1], value the N-1 tokens after it."""
        if end - self.N + 1 >= 0:
            lru_insert(self.pool, self.text[end - self.N + 1], tuple(self.text[end - self.N + 2 : end + 1]), self.G)

    # ------------------------------------------------------------------ proposal
    def _trie(self, root: int) -> tuple[list[int], list[int]]:
        """The root's pool n-grams (oldest first, as the reference feeds them) merged into one trie."""
        return trie(root, (ngram[: self.draft_len] for ngram in self.pool.get(root, ())))

    def _layout(self, parents: list[int], C: int, f: int) -> Layout:
        """The block layout of a trie (parents) and a C x (f+1) window; built once per shape (static, so the
        loop converts it once)."""
        key = (tuple(parents), C, f)
        if key not in self._layouts:
            if len(self._layouts) > 512:
                self._layouts.clear()
            t_depth, t_allowed = tree_layout(parents)
            w_depth, w_allowed = window_layout(C, f)
            n, m = len(parents), w_depth.numel() - 1  # the window's root is the tree's row 0
            depth = torch.cat([t_depth, w_depth[1:]])
            allowed = torch.zeros(n + m, n + m, dtype=torch.bool)
            allowed[:n, :n] = t_allowed
            allowed[n:, 0] = w_allowed[1:, 0]
            allowed[n:, n:] = w_allowed[1:, 1:]
            self._layouts[key] = Layout(depth, allowed, static=True)
        return self._layouts[key]

    def propose(self, tokens: list[int]) -> Block:
        ids, parents = self._trie(tokens[-1])
        window = [t for row in self.rows for t in row]
        block = Block(torch.tensor(ids + window, dtype=torch.long), parents, self._layout(parents, self.cols, self.fill))
        assert block.size <= self.min_bc <= self.bc, (block.size, self.min_bc, self.bc)
        return block

    # ------------------------------------------------------------------ observation
    def observe(self, step: Step) -> None:
        n, C, f = step.block.n_tree, self.cols, self.fill
        # the deepest window row of every column (column 0 of a lone row 0 is the root itself)
        last = [0 if f == 0 and i == 0 else n + f * C + i - 1 for i in range(C)]
        new = step.logits[last].argmax(-1).tolist()
        if f < self.N - 2:
            self._advance(new)
        else:
            root, G = int(step.block.ids[0]), self.G
            for i in range(C):
                key = root if i == 0 else self.rows[0][i - 1]
                lru_insert(self.pool, key, tuple(self.rows[r][i] for r in range(1, f + 1)) + (new[i],), G)
            stack = self.rows[1:] + [new]  # slide one column: row0 <- row1[1:], row_l <- row_{l+1}, last <- new
            self.rows = [stack[0][1:]] + stack[1:]
        self._commit(step.committed)
