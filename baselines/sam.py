"""SAM-Decoding (Hu et al., arXiv 2411.10666, ACL 2025; reference code hyx1999/SAM-Decoding): a suffix
automaton over the text so far finds, in O(1) amortised per token, the longest suffix of the text that
occurred earlier; the draft is the chain that followed its first occurrence.

The automaton (`SuffixAutomaton`) is built over the prompt at the start of each generation and extended
with every committed token except the pending root. A match state (state, length) is advanced before each
token is added, so it always holds the longest suffix that occurred earlier. To draft, the match is
advanced by the root without changing the automaton; `to_anc` then backs off along suffix links to a
shorter match while the first occurrence leaves fewer than n - 1 tokens to copy, and the draft is
[root] + the n - 1 tokens after that first occurrence (fewer at the end of the text).

Two arms, as the reference's two programs:
- `sam` (SAMDecoding, the reference's `samd_sam_only`): always the automaton's chain, of
  n = min(max_predicts, 1 + int(alpha * match length), bc) tokens (root included).
- `sam_tr` (SAMWithRecycling, the reference's `samd` with Token Recycling as the auxiliary drafter, the
  paper's SAM-D[TR]): the chain of n = min(n_predicts, bc) tokens when the match is at least
  `len_threshold` long, else Token Recycling's tree (`baselines.recycling`, the tree fitted for the model
  at this bc). The successor matrix observes every forward, whichever drafted it, and persists across the
  job's prompts, as in the reference.

Where this departs from the reference, and why:
- No static automaton: the reference's is built offline from Vicuna-7B's answers to Alpaca, GSM8K and
  Python-instruction prompts, which are neither this model's outputs nor calib prompts; its README also
  advises it off for larger models. With no static match, the reference's selection reduces to the one
  above (its static length is -len_bias).
- The chain is cut to bc tokens, and `to_anc` asks for the continuation this bc can use (not n_predicts
  = 40 at every bc); a chain that runs into the end of the text is drafted shorter instead of padded with
  id 0.
- Token Recycling's tree is this harness's fitted tree at bc (calibrated on the calib prompts), not the
  reference's 61-node template truncated to bc.
- The match state follows a state's clone when the automaton splits it (the textbook automaton); the
  reference leaves it on the original state.
"""

from __future__ import annotations

from baselines.recycling import TokenRecycling
from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, Step, chain_block


class SuffixAutomaton:
    """The online suffix automaton of a token sequence (Blumer et al., 1985), with each state's first end
    position, and a match state: the longest suffix of the text that occurred before its last token."""

    def __init__(self):
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length, self.first_end = [-1], [0], [-1]
        self.last = 0
        self.text: list[int] = []
        self.match = (0, 0)  # (state, length)

    def transfer(self, state: int, length: int, token: int) -> tuple[int, int]:
        """The longest suffix of (the string of `state`, cut to `length`) + token that occurs in the text."""
        while state and token not in self.next[state]:
            state = self.link[state]
            length = self.length[state]
        if token in self.next[state]:
            return self.next[state][token], length + 1
        return 0, 0

    def append(self, token: int) -> None:
        self.match = self.transfer(*self.match, token)  # before the token is added: an earlier occurrence
        pos = len(self.text)
        self.text.append(token)
        cur = self._new(self.length[self.last] + 1, pos)
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p == -1:
            self.link[cur] = 0
        else:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                clone = self._new(self.length[p] + 1, self.first_end[q])
                self.next[clone] = dict(self.next[q])
                self.link[clone] = self.link[q]
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
                state, length = self.match
                if state == q and length <= self.length[clone]:  # the match's string now lives in the clone
                    self.match = (clone, length)
        self.last = cur

    def extend(self, tokens) -> None:
        for t in tokens:
            self.append(t)

    def _new(self, length: int, first_end: int) -> int:
        self.next.append({})
        self.link.append(-1)
        self.length.append(length)
        self.first_end.append(first_end)
        return len(self.length) - 1

    def match_root(self, root: int) -> tuple[int, int]:
        """The match (state, length) of text + root, the automaton left as it is."""
        return self.transfer(*self.match, root)

    def copy(self, state: int, length: int, n: int) -> list[int]:
        """Up to n - 1 tokens that followed the first occurrence of the match (state, length), after `to_anc`'s
        back-off to a shorter match whose first occurrence leaves n - 1 tokens."""
        if length == 0 or n <= 1:
            return []
        N = len(self.text)
        while self.link[state] > 0 and n > N - self.first_end[state]:
            state = self.link[state]
        start = self.first_end[state] + 1
        return self.text[start : start + n - 1]


class SAMDecoding(Drafter):
    """SAM-Decoding's automaton alone (the reference's `samd_sam_only`)."""

    name = "sam"
    min_bc = 2

    def __init__(self, bc: int, max_predicts: int = 60, alpha: float = 4.0):
        if max_predicts < 2 or alpha <= 0:
            raise ConfigError("method.max_predicts must be >= 2 and method.alpha > 0")
        self.bc, self.max_predicts, self.alpha = bc, max_predicts, alpha

    def start(self, prompt_ids: list[int]) -> None:
        self.sam = SuffixAutomaton()
        self.sam.extend(prompt_ids)
        return None

    def _catch_up(self, tokens: list[int]) -> None:
        """Add the committed tokens not yet in the automaton, the pending root (tokens[-1]) left out."""
        self.sam.extend(tokens[len(self.sam.text) : -1])

    def propose(self, tokens: list[int]) -> Block:
        self._catch_up(tokens)
        state, length = self.sam.match_root(tokens[-1])
        n = min(self.max_predicts, 1 + int(self.alpha * length), self.bc)
        return chain_block([tokens[-1]] + self.sam.copy(state, length, n))


class SAMWithRecycling(SAMDecoding):
    """SAM-Decoding with Token Recycling as its auxiliary drafter (the reference's `samd`, SAM-D[TR])."""

    name = "sam_tr"

    def __init__(self, bc: int, n_predicts: int = 40, len_threshold: int = 5, tree="auto",
                 model_name: str | None = None):
        if n_predicts < 2 or len_threshold < 1:
            raise ConfigError("method.n_predicts must be >= 2 and method.len_threshold >= 1")
        self.bc, self.n_predicts, self.len_threshold = bc, n_predicts, len_threshold
        self.recycling = TokenRecycling(bc, tree=tree, model_name=model_name)
        self.tree_source = self.recycling.tree_source

    def setup(self, model) -> None:
        self.recycling.setup(model)

    def start(self, prompt_ids: list[int]) -> None:
        self.recycling.start(prompt_ids)
        return super().start(prompt_ids)

    def propose(self, tokens: list[int]) -> Block:
        self._catch_up(tokens)
        state, length = self.sam.match_root(tokens[-1])
        if length >= self.len_threshold:
            return chain_block([tokens[-1]] + self.sam.copy(state, length, min(self.n_predicts, self.bc)))
        return self.recycling.propose(tokens)

    def observe(self, step: Step) -> None:
        self.recycling.observe(step)
