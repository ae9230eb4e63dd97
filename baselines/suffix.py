"""SuffixDecoding (Oliaro et al., arXiv 2411.04975, NeurIPS 2025; reference code:
snowflakedb/ArcticInference `csrc/suffix_decoding/`, vLLM's `suffix` speculative method).

Two suffix trees, each holding every substring of length <= `max_depth` (D) of its sequences with its
number of occurrences:
- the local tree: this prompt + every token committed so far (rebuilt per generation);
- the global tree: the responses of the job's earlier generations, and the current response as it grows
  (kept across the job's prompts).
Each step, for every match length p = 1 .. D - 1 whose last p tokens (ending at the root) occur in a
tree, a speculation tree is grown best-first from the matched node: a node's probability is its parent's
times count(child) / count(node), children below `min_token_prob` are dropped, and at most
budget(p) = min(bc - 1, floor(p * max_spec_factor + max_spec_offset)) tokens are taken. Its score is the
sum of its nodes' probabilities (the expected number of accepted tokens); the best-scoring draft over
every p and both trees wins (ties: the longer match, then the local tree).

Where this departs from the reference, and why:
- The draft is the paper's **tree** (the reference simulator's `use_tree_spec=True`); vLLM's and Arctic's
  production paths draft a chain. A tree is the stronger use of a bc budget (bc - 1 = max_spec_tokens).
- The trees are plain tries cut at depth D, not path-compressed: the same counts and the same drafts,
  O(D) per appended token (as the reference), in Python.
- The global tree keeps every response of the job (no FIFO eviction at `max_cached_requests`): a job here
  is at most a few hundred prompts, well under the reference's 10^4-10^5.
- The pattern's own occurrence at the end of the text counts in the denominator, as in the reference: one
  earlier occurrence plus the tail itself gives a first child of probability 0.5.
"""

from __future__ import annotations

import heapq
import math

from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, tree_block


class SuffixTrie:
    """Every substring of length <= max_depth of the appended sequences, with its occurrence count.

    A node is a list [children {token: node}, count, token]. Appending a token extends every open suffix of
    the current sequence (at most max_depth of them) by it."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.root = [{}, 0, None]
        self.open: list[list] = []  # nodes of the current sequence's suffixes of length < max_depth, by length

    def start_sequence(self) -> None:
        self.open = []

    def append(self, token: int) -> None:
        nxt = []
        for node in [self.root] + self.open:
            child = node[0].get(token)
            if child is None:
                child = node[0][token] = [{}, 0, token]
            child[1] += 1
            nxt.append(child)
        self.open = nxt[: self.max_depth - 1]  # a suffix of length max_depth is not extended further

    def extend(self, tokens) -> None:
        for t in tokens:
            self.append(t)

    def find(self, pattern) -> list | None:
        node = self.root
        for t in pattern:
            node = node[0].get(t)
            if node is None:
                return None
        return node


def speculate(trie: SuffixTrie, context: list[int], max_spec_tokens: int, max_spec_factor: float,
              max_spec_offset: float, min_token_prob: float) -> tuple[float, int, list[int], list[int]]:
    """The best draft (score, match length, tokens, parent indices (-1 = under the root)) over every match
    length p of `context`'s tail, as the reference's `speculate`: a new draft replaces the kept one when its
    score is at least as high (so ties go to the longer match)."""
    best = (0.0, 0, [], [])
    for p in range(1, len(context)):
        node = trie.find(context[-p:])
        if node is None:
            break  # no longer suffix can match either
        budget = max(0, min(max_spec_tokens, math.floor(p * max_spec_factor + max_spec_offset + 1e-6)))
        tokens, parents, score = grow(node, budget, min_token_prob)
        if tokens and score >= best[0]:
            best = (score, p, tokens, parents)
    return best


def grow(node: list, budget: int, min_token_prob: float) -> tuple[list[int], list[int], float]:
    """Best-first speculation tree below `node`: up to `budget` tokens, each with probability
    prob(parent) * count(child) / count(parent) >= min_token_prob."""
    heap = [(-1.0, 0, node, -1)]  # (-prob, tie-break, node, parent index of its children)
    tokens, parents, score, serial = [], [], 0.0, 1
    while heap and len(tokens) < budget:
        neg, _, n, parent = heapq.heappop(heap)
        if n is not node:  # an emitted node (the matched node itself is the root's stand-in)
            tokens.append(n[2])
            parents.append(parent)
            score -= neg
            parent = len(tokens) - 1
        children = sorted(n[0].values(), key=lambda c: -c[1])
        for child in children:
            q = -neg * child[1] / n[1]
            if q < min_token_prob:
                break
            heapq.heappush(heap, (-q, serial, child, parent))
            serial += 1
    return tokens, parents, score


class SuffixDecoding(Drafter):
    name = "suffix"
    min_bc = 2

    def __init__(self, bc: int, max_depth: int = 64, max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
                 min_token_prob: float = 0.1, global_tree: bool = True):
        if max_depth < 2 or max_spec_factor <= 0 or not 0 <= min_token_prob <= 1:
            raise ConfigError("method.max_depth must be >= 2, max_spec_factor > 0, min_token_prob in [0, 1]")
        self.max_depth = max_depth
        self.max_spec_tokens = bc - 1
        self.options = (max_spec_factor, max_spec_offset, min_token_prob)
        self.use_global = global_tree

    def setup(self, model) -> None:
        self.global_trie = SuffixTrie(self.max_depth)  # the job's responses, across prompts

    def start(self, prompt_ids: list[int]) -> None:
        self.local = SuffixTrie(self.max_depth)
        self.local.extend(prompt_ids)
        self.global_trie.start_sequence()  # a new response
        self.seen = len(prompt_ids)
        return None

    def _catch_up(self, tokens: list[int]) -> None:
        """Append the committed tokens not yet in the trees (the root included: it is committed)."""
        new = tokens[self.seen :]
        self.local.extend(new)
        self.global_trie.extend(new)
        self.seen = len(tokens)

    def propose(self, tokens: list[int]) -> Block:
        self._catch_up(tokens)
        context = tokens[-self.max_depth :]
        draft = speculate(self.local, context, self.max_spec_tokens, *self.options)
        if self.use_global:
            other = speculate(self.global_trie, context, self.max_spec_tokens, *self.options)
            if other[0] > draft[0]:
                draft = other
        _, _, drafts, parents = draft
        return tree_block([tokens[-1]] + drafts, [-1] + [p + 1 for p in parents])
