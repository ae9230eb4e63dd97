"""PLD — Prompt Lookup Decoding (Saxena, 2023, github.com/apoorvumang/prompt-lookup-decoding).

For n = max_ngram_size .. 1: find the earliest earlier occurrence of the last n tokens of
(prompt + output) whose continuation fits, and draft the next num_pred_tokens tokens as a chain
(`mtp.drafting.copy_matches`). No match: a plain AR step (block = root only).

- `truncated=false` (reference code): the continuation must be whole (num_pred_tokens long).
  `truncated=true` (transformers' `prompt_lookup_num_tokens`): a shorter continuation at the end of the
  text is taken too. transformers also drops draft tokens after an EOS; here the loop stops at EOS
  instead, which yields the same output.
- `tree=true`: spend the whole bc budget on a trie of several distinct matches (all n, all occurrences,
  earliest first) instead of one chain.
- The chain is cut to bc - 1 drafts, so at bc 10 the paper's depth-10 chain becomes depth 9.
"""

from __future__ import annotations

from mtp.drafting import copy_matches, trie
from mtp.errors import ConfigError
from mtp.loop import Block, Drafter, tree_block


class PromptLookup(Drafter):
    name = "pld"
    min_bc = 2

    def __init__(self, bc: int, max_ngram_size: int = 3, num_pred_tokens: int = 10, truncated: bool = False,
                 tree: bool = False):
        if max_ngram_size < 1 or num_pred_tokens < 1:
            raise ConfigError("method.max_ngram_size and method.num_pred_tokens must be >= 1")
        self.bc, self.max_ngram_size, self.truncated, self.tree = bc, max_ngram_size, truncated, tree
        self.num_pred_tokens = min(num_pred_tokens, bc - 1)  # tokens per forward = 1 + drafts <= bc

    def matches(self, tokens: list[int]):
        """Continuations of earlier occurrences of the text's last n tokens, n from long to short,
        earliest occurrence first: yields lists of up to num_pred_tokens tokens."""
        return copy_matches(tokens, self.max_ngram_size, self.num_pred_tokens, self.truncated)

    def propose(self, tokens: list[int]) -> Block:
        root = tokens[-1]
        if not self.tree:
            draft = next(self.matches(tokens), [])
            return tree_block([root] + draft, list(range(-1, len(draft))))
        return tree_block(*trie(root, self.matches(tokens), max_rows=self.bc))  # several matches in one trie
