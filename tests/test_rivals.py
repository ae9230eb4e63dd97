"""SuffixDecoding, SAM-Decoding (alone and with Token Recycling) and LogitSpec: greedy output identical to
AR at every bc on the tiny models, blocks within bc, and each drafter's data structure and drafting rule
checked against a brute-force reading of its reference algorithm."""

import functools
import random

import pytest
import torch

from baselines.logitspec import LogitSpec, NgramPool, draft_length
from baselines.sam import SAMDecoding, SAMWithRecycling, SuffixAutomaton
from baselines.suffix import SuffixDecoding, SuffixTrie, speculate
from mtp.loop import Decoder, Step, chain_block

from .conftest import decode

BCS = (10, 17, 30, 60)
MAKERS = {
    "suffix": lambda bc: SuffixDecoding(bc),
    "suffix_local": lambda bc: SuffixDecoding(bc, global_tree=False, max_depth=8),
    "sam": lambda bc: SAMDecoding(bc),
    "sam_tr": lambda bc: SAMWithRecycling(bc),
    "logitspec": lambda bc: LogitSpec(bc),
}

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 40
run = functools.partial(decode, n=N_NEW)


@pytest.mark.parametrize("bc", BCS)
@pytest.mark.parametrize("name", list(MAKERS))
def test_greedy_equals_ar(tiny, refs, bc, name):
    model, tok, prompts = tiny
    drafter = MAKERS[name](bc)
    drafter.setup(model)
    dec = Decoder(model, [])
    steps = 0
    for ids, ref in zip(prompts, refs):  # one drafter for all prompts: job-level state carries over
        g = dec.generate(drafter, ids, N_NEW)
        assert g.new_ids == ref and g.tokens_fed_max <= bc
        steps += g.decode_calls
    assert steps < len(prompts) * N_NEW  # the drafts were accepted at least once (tiny models' outputs loop)


# --------------------------------------------------------------------------- SuffixDecoding
def brute_count(seqs, pattern, max_depth):
    """Occurrences of `pattern` in `seqs` (a substring longer than max_depth is not held)."""
    n = len(pattern)
    return 0 if n > max_depth else sum(s[i : i + n] == pattern for s in seqs for i in range(len(s) - n + 1))


def test_suffix_trie_counts_every_substring():
    rng = random.Random(0)
    seqs = [[rng.randrange(4) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    trie = SuffixTrie(max_depth=6)
    for s in seqs:
        trie.start_sequence()
        trie.extend(s)
    for _ in range(300):
        pattern = [rng.randrange(4) for _ in range(rng.randint(1, 8))]
        node = trie.find(pattern)
        assert (node[1] if node else 0) == brute_count(seqs, pattern, 6), pattern


def test_suffix_tree_is_grown_best_first_by_frequency():
    # after "1 2": "3" twice, "4" once, and the tail "1 2" itself once -> p(3) = 2/4 = 0.5, p(4) = 0.25
    text = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4, 1, 2]
    trie = SuffixTrie(max_depth=64)
    trie.extend(text)
    score, p, tokens, parents = speculate(trie, text, 10, 1.0, 0.0, 0.1)
    # the longest matches (p >= 2) are "1 2" (p = 2) and "x 1 2" never repeats: p = 2 wins, budget 2
    assert p == 2 and tokens == [3, 4] and parents == [-1, -1] and score == pytest.approx(0.75)
    # factor 2: the match of 2 tokens speculates 4, the next best being 3's children 9 and 8 (0.25 each)
    score, _, tokens, parents = speculate(trie, text, 10, 2.0, 0.0, 0.1)
    assert tokens[:2] == [3, 4] and sorted(tokens[2:]) == [8, 9] and parents == [-1, -1, 0, 0]
    # below min_token_prob nothing is drafted under that node
    assert speculate(trie, text, 10, 2.0, 0.0, 0.3)[2] == [3]


def test_suffix_uses_earlier_responses():
    """The global tree holds the job's earlier responses: a response repeated by the next prompt is drafted
    from it, which the prompt's own tree cannot do."""
    d = SuffixDecoding(bc=8)
    d.setup(None)
    d.start([50, 51])
    d.propose([50, 51, 1, 2, 3, 4, 5, 6])  # the first response: 1 2 3 4 5 6
    d.start([60, 61])
    block = d.propose([60, 61, 1, 2])
    assert block.ids.tolist()[:3] == [2, 3, 4]
    d_local = SuffixDecoding(bc=8, global_tree=False)
    d_local.setup(None)
    d_local.start([60, 61])
    assert d_local.propose([60, 61, 1, 2]).ids.tolist() == [2]


# --------------------------------------------------------------------------- SAM-Decoding
def longest_earlier_suffix(text):
    """Length of the longest suffix of text that also ends somewhere before the last position."""
    best = 0
    for n in range(1, len(text)):
        pattern = text[-n:]
        if any(text[i : i + n] == pattern for i in range(len(text) - n)):
            best = n
    return best


def test_suffix_automaton_matches_brute_force():
    rng = random.Random(1)
    for trial in range(20):
        text = [rng.randrange(3) for _ in range(rng.randint(1, 60))]
        sam = SuffixAutomaton()
        for i, t in enumerate(text):
            sam.append(t)
            assert sam.match[1] == longest_earlier_suffix(text[: i + 1]), (trial, i)
        # drafting with a root: the match of text + [root] and the copy after its first occurrence
        root = rng.randrange(3)
        full = text + [root]
        state, length = sam.match_root(root)
        chain = sam.copy(state, length, 5)
        assert length == longest_earlier_suffix(full) or (length == 0 and longest_earlier_suffix(full) == 0)
        if length:
            first = next(i for i in range(len(text)) if text[max(0, i - length + 1) : i + 1] == full[-length:]
                         and i - length + 1 >= 0)
            if len(text) - first >= 5:  # enough continuation: no back-off
                assert chain == text[first + 1 : first + 5]


def test_sam_backs_off_to_a_match_with_room_to_copy():
    # "1 2 3" first occurs at the very end: no continuation; "3" alone occurred earlier, followed by 7 7 7
    text = [3, 7, 7, 7, 1, 2]
    sam = SuffixAutomaton()
    sam.extend(text)
    state, length = sam.match_root(3)
    chain = sam.copy(state, length, 4)
    assert length == 1 and chain == [7, 7, 7]


def test_sam_tr_uses_recycling_below_the_threshold(tiny):
    model = tiny[0]
    d = SAMWithRecycling(bc=10, len_threshold=3, tree="rule")
    d.setup(model)
    d.start([5, 6, 7, 8, 9])
    assert d.propose([5, 6, 7, 8, 9, 5]).size == 10  # match of 1: Token Recycling's full tree
    # match "5 6 7" (3 tokens): the copy after its first occurrence, up to the text's end (root 7 pending)
    chain = d.propose([5, 6, 7, 8, 9, 5, 6, 7])
    assert chain.ids.tolist() == [7, 8, 9, 5, 6] and chain.parents == [-1, 0, 1, 2, 3]


# --------------------------------------------------------------------------- LogitSpec
def test_ngram_pool_keeps_the_latest_longest_continuation():
    pool = NgramPool(max_ngram_size=2, length=3)
    pool.extend([1, 2, 3, 4, 1, 2, 5])
    assert pool.lookup([9, 1, 2]) == [3, 4, 1]  # the later "1 2" has only [5] after it: the longer stays
    assert pool.lookup([9, 4]) == [1, 2, 5] and pool.lookup([9, 5]) is None  # "5" ends the text
    pool.extend([6, 7, 8])  # now "1 2" at 4 has [5, 6, 7]: as long, and later
    assert pool.lookup([1, 2]) == [5, 6, 7]


@pytest.mark.parametrize("bc", [2, 5, 10, 21, 30, 64])
def test_logitspec_star_of_chains_within_bc(bc):
    """Branch A (root's own retrieval), then the next-next candidates by rank with the reference's chain
    lengths, all hanging from the root, never more than bc tokens (the reference crashes at bc <= 21)."""
    V = 100
    d = LogitSpec(bc, num_pred_tokens=20)
    prompt = list(range(40, 70)) * 2  # every token has a 20-token continuation
    d.start(prompt)
    logits = torch.arange(V, 0, -1, dtype=torch.float)  # rank i = token i
    d.observe_prefill(None, 0, logits)
    block = d.propose(prompt + [0])
    ids, parents = block.ids.tolist(), block.parents
    assert len(ids) <= bc and ids[0] == 0
    expect, room = [], bc - 1  # token 0 is the root (rank 0, skipped); no pool key ends in 0
    for idx in range(1, bc):
        if room <= 0:
            break
        chain = [idx][: min(draft_length(idx), room)]  # tokens 1.. have no continuation in the pool
        expect += chain
        room -= len(chain)
    assert ids[1:] == expect and all(p == 0 for p in parents[1:])


def test_logitspec_retrieves_continuations_of_root_and_candidates():
    d = LogitSpec(bc=12, max_ngram_size=2, num_pred_tokens=5)
    prompt = [1, 2, 3, 4, 5, 6, 9, 2, 7, 8]
    d.start(prompt)
    logits = torch.full((20,), -5.0)
    logits[2], logits[9] = 5.0, 4.0  # root 2, next-next candidate 9
    d.observe_prefill(None, 2, logits)
    block = d.propose(prompt + [2])
    ids, parents = block.ids.tolist(), block.parents
    # branch A: "8 2"? no; "2" -> latest longest: [3, 4, 5, 6, 9] (at 1) vs [7, 8] (at 7): the longer
    assert ids[1:6] == [3, 4, 5, 6, 9] and parents[1:6] == [0, 1, 2, 3, 4]
    # candidate 9 (rank index 1): [9] + continuation of "2 9"? no; of "9": [2, 7, 8] -> cut to 4 tokens
    assert ids[6:10] == [9, 2, 7, 8] and parents[6:10] == [0, 6, 7, 8]


def test_logitspec_drafts_from_the_row_of_the_last_accepted_node():
    d = LogitSpec(bc=4)
    d.start([1, 2, 3])
    logits = torch.zeros(3, 10)
    logits[2, 7] = 9.0
    step = Step(chain_block([3, 4, 5]), logits, [0, 1, 2], [4, 5, 7])
    d.observe(step)
    assert int(d.last.argmax()) == 7


def test_published_figures_sit_beside_our_tau():
    """The extended Table 1's references: each rival's published Spec-Bench τ and speedup, its model and GPU,
    and this harness's τ for the same method at each bc of the table1 sweep (blank where it did not run)."""
    import pandas as pd

    from experiments import paper
    from experiments.tables import table1_references

    runs = pd.DataFrame([
        {"status": "ok", "group": "table1", "model": "smollm2_135m", "method": "sam_tr", "bc": 30, "tau": 1.5,
         "ci": {"tau": [1.4, 1.6]}},
        {"status": "ok", "group": "table1", "model": "smollm2_135m", "method": "esp", "bc": 30, "tau": 1.2, "ci": None},
    ])
    df = table1_references(runs).set_index("method")
    assert len(df) == len(paper.RIVALS_SPEC_BENCH)
    assert df.loc["SAM+TR", "published τ"] == 3.03 and df.loc["SAM+TR", "τ smollm2_135m bc30"] == "1.500 [1.400, 1.600]"
    assert pd.isna(df.loc["PLD", "τ smollm2_135m bc30"]) and "Vicuna-7B" in df.loc["SAM", "published on"]
