"""LogitSpec (arXiv 2507.01449, 2025; reference code smart-lty/LogitSpec): the logit row that predicts the
next token (the root) also ranks plausible next-next tokens, and retrieval keyed on both finds their
continuations.

A pool maps every n-gram (n = 1 .. max_ngram_size) of the text so far to the up to num_pred_tokens tokens
that followed it (the latest occurrence with a continuation at least as long; keys at the very end of the
text, with nothing after them, are not entered). It is built over the prompt and, after every step, the
committed tokens are added and the n-grams starting in the last 2 * num_pred_tokens positions rescanned.
Each step, with r = the root and `last` = the logit row that produced it:
1. Branch A: the pool's continuation of the longest suffix (n = 3, 2, 1) of text + [r], a chain under r.
2. Next-next candidates: the top-bc tokens of `last` in rank order, r skipped; candidate d at rank index
   idx (r's index counted) gets [d] + the pool's continuation of the longest suffix of text + [r, d], cut
   to 4 tokens when idx <= 8, 3 when idx <= 32, else 1, and to the room left; a chain under r.
3. Until the block holds bc tokens. The tree is a star of chains from r; chains are not merged (a token
   may appear twice among r's children; verification takes the first).

Where this departs from the reference, and why:
- Branch A is cut to bc - 1 tokens and candidates stop once the block is full: the reference adds branch A
  unchecked (up to num_pred_tokens tokens) and then appends empty or negative slices, which crashes at
  bc <= 21 (`draft_tree_capacity`); it runs unchanged at its own bc 64.
- The pool is built over the committed text excluding the pending root (the reference's input ids at the
  same point); `last` at T > 0 is the row the root was sampled from (the reference is greedy only).
"""

from __future__ import annotations

import torch

from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Step, tree_block


def draft_length(idx: int) -> int:
    """The reference's chain length for the candidate at rank index idx (r's index included)."""
    return 4 if idx <= 8 else 3 if idx <= 32 else 1


class NgramPool:
    """n-gram (n = 1 .. max_ngram_size) -> the up to `length` tokens after its latest occurrence with a
    continuation at least as long as the stored one."""

    def __init__(self, max_ngram_size: int, length: int):
        self.max_ngram_size, self.length = max_ngram_size, length
        self.pool: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(max_ngram_size)]
        self.ids: list[int] = []

    def _scan(self, start: int) -> None:
        ids, L = self.ids, len(self.ids)
        for i in range(max(start, 0), L):
            for n in range(1, self.max_ngram_size + 1):
                end = i + n
                if end >= L:
                    continue
                key, cont = tuple(ids[i:end]), ids[end : end + self.length]
                table = self.pool[n - 1]
                if key not in table or len(cont) >= len(table[key]):
                    table[key] = cont

    def extend(self, tokens: list[int]) -> None:
        """Add tokens; rescan the n-grams that start in the last 2 * length positions (the reference's update)."""
        if not tokens:
            return
        first = not self.ids
        self.ids += tokens
        self._scan(0 if first else len(self.ids) - 2 * self.length)

    def lookup(self, text: list[int]) -> list[int] | None:
        """The continuation of the longest suffix of `text` (n = max_ngram_size .. 1) in the pool."""
        for n in range(min(self.max_ngram_size, len(text)), 0, -1):
            cont = self.pool[n - 1].get(tuple(text[-n:]))
            if cont is not None:
                return cont
        return None


class LogitSpec(Drafter):
    name = "logitspec"
    min_bc = 2

    def __init__(self, bc: int, max_ngram_size: int = 3, num_pred_tokens: int = 20):
        if max_ngram_size < 1 or num_pred_tokens < 1:
            raise ConfigError("method.max_ngram_size and method.num_pred_tokens must be >= 1")
        self.bc, self.max_ngram_size, self.num_pred_tokens = bc, max_ngram_size, num_pred_tokens

    def start(self, prompt_ids: list[int]) -> None:
        self.pool = NgramPool(self.max_ngram_size, self.num_pred_tokens)
        self.pool.extend(list(prompt_ids))
        self.last = None
        return None

    def observe_prefill(self, probe_logits, root: int, root_logits: torch.Tensor) -> None:
        self.last = root_logits

    def observe(self, step: Step) -> None:
        self.last = step.logits[step.path[-1]]  # the row the next root (the bonus token) came from

    def propose(self, tokens: list[int]) -> Block:
        self.pool.extend(tokens[len(self.pool.ids) : -1])  # committed tokens; the pending root left out
        r, room = tokens[-1], self.bc - 1
        chains = []
        tail = tokens[-self.max_ngram_size :]
        a = self.pool.lookup(tail)  # branch A: text + [r]
        if a:
            chains.append(a[:room])
            room -= len(chains[-1])
        if room > 0 and self.last is not None:
            for idx, d in enumerate(torch.topk(self.last, min(self.bc, self.last.shape[-1])).indices.tolist()):
                if d == r:
                    continue
                chain = ([d] + (self.pool.lookup(tail + [d]) or []))[: min(draft_length(idx), room)]
                chains.append(chain)
                room -= len(chain)
                if room <= 0:
                    break
        ids, parents = [r], [-1]
        for chain in chains:  # each chain hangs from the root
            for j, t in enumerate(chain):
                parents.append(0 if j == 0 else len(ids) - 1)
                ids.append(t)
        return tree_block(ids, parents)
