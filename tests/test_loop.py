"""The decode loop: AR equals transformers' greedy generate, a tree forward equals sequential decoding,
KV compaction equals the cache of the accepted path, counters are exact."""

import pytest
import torch
from transformers import DynamicCache

from mtp.kv import keep_rows, with_cache
from mtp.loop import Decoder, Drafter, Draws, tree_block, tree_layout


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=0)
    return out[0, len(ids):].tolist()


def test_ar_equals_generate_tiny(tiny):
    model, tok, prompts = tiny
    dec = Decoder(model, tok.eos_token_id)
    for ids in prompts:
        g = dec.generate(Drafter(), ids, 40)
        assert g.new_ids == hf_greedy(model, ids, 40)


@pytest.mark.slow
def test_ar_equals_generate_smollm2(smollm2):
    model, tok, prompts = smollm2
    dec = Decoder(model, tok.eos_token_id)
    for ids in prompts[:2]:
        g = dec.generate(Drafter(), ids, 24)
        ref = hf_greedy(model, ids, 24)
        assert g.new_ids == ref, (tok.decode(g.new_ids), tok.decode(ref))


def test_ar_counters_exact(tiny):
    model, tok, prompts = tiny
    g = Decoder(model, eos_ids=[]).generate(Drafter(), prompts[0], 25)  # no EOS: runs to the budget
    assert len(g.new_ids) == 25 and g.stop == "max_new_tokens"
    # the prefill yields the first token; each decode forward commits exactly one more
    assert g.prefill_calls == 1 and g.decode_calls == 24 and g.prefill_calls + g.decode_calls == len(g.new_ids)
    assert g.committed_per_step == [1] * 24 and g.accept_hist == {1: 24}
    assert g.tokens_fed_max == 1 and g.tokens_fed_mean == 1.0


# a hand-built tree: 3 branches under the root, depth 4 on the first, 3 on the second
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4, 6, 7]


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor([ids]), **with_cache(model, cache))
    return cache


def _path(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def test_tree_layout():
    depth, allowed = tree_layout(PARENTS)
    assert depth.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 4]
    for i in range(len(PARENTS)):
        assert set(allowed[i].nonzero().flatten().tolist()) == set(_path(PARENTS, i))


def test_tree_forward_equals_sequential(tiny):
    model, tok, prompts = tiny
    prompt = prompts[1]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (len(PARENTS),), generator=g).tolist()
    block = tree_block(tokens, PARENTS)
    dec = Decoder(model, tok.eos_token_id)
    cache = _prefill(model, prompt)
    with torch.inference_mode():
        tree_logits, _ = dec._forward(block, cache, len(prompt))
        for i in range(len(PARENTS)):
            seq = prompt + [tokens[j] for j in _path(PARENTS, i)]
            ref = model(torch.tensor([seq])).logits[0, -1].float()
            torch.testing.assert_close(tree_logits[i], ref, atol=1e-4, rtol=1e-4)


def test_kv_compaction_equals_accepted_path_cache(tiny):
    model, tok, prompts = tiny
    prompt = prompts[0]
    tokens = list(range(10, 10 + len(PARENTS)))
    dec = Decoder(model, tok.eos_token_id)
    for accepted in ([0, 2, 6, 8], [0, 1, 4, 7, 9], [0], [0, 3]):
        cache = _prefill(model, prompt)
        with torch.inference_mode():
            dec._forward(tree_block(tokens, PARENTS), cache, len(prompt))
        keep_rows(cache, len(prompt), accepted)
        ref = _prefill(model, prompt + [tokens[i] for i in accepted])
        assert cache.get_seq_length() == len(prompt) + len(accepted)
        for layer, ref_layer in zip(cache.layers, ref.layers, strict=True):
            torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-5)


class OracleDrafter(Drafter):
    """Proposes a tree whose first branch is the true greedy continuation (from a reference run),
    with decoys beside it, so verification must accept several tokens per step."""

    def __init__(self, reference: list[int], prompt_len: int, depth: int = 3):
        self.reference, self.prompt_len, self.depth = reference, prompt_len, depth

    def propose(self, tokens):
        done = len(tokens) - self.prompt_len
        truth = self.reference[done:done + self.depth]
        ids, parents = [tokens[-1]], [-1]
        for d, t in enumerate(truth):  # chain of truths, each with a wrong sibling
            parent = 0 if d == 0 else len(ids) - 2
            ids += [t, (t + 1) % 200]
            parents += [parent, parent]
        return tree_block(ids, parents)


def test_tree_steps_commit_several_and_stay_exact(tiny):
    model, tok, prompts = tiny
    dec = Decoder(model, eos_ids=[])
    for ids in prompts:
        ref = dec.generate(Drafter(), ids, 30).new_ids
        g = dec.generate(OracleDrafter(ref, len(ids)), ids, 30)
        assert g.new_ids == ref
        assert max(g.committed_per_step) == 4  # 3 accepted drafts + the bonus
        assert sum(g.committed_per_step) == 29 and g.tokens_fed_max == 7


def _rejection_chi2(dec, p_logits, q, n_children, trials, gen, offered=None, draws_seen="all"):
    """Chi-square statistic of the verifier's output token against p over `trials` draws, children
    drawn from q by Gumbel-Top-K without replacement. `offered`: the ranks the tree carries rows for (all
    by default). `draws_seen="offered"` hands the verifier only the offered children as if they were the
    draws: the verifier before gapped ranks were handled."""
    V = p_logits.shape[0]
    counts = torch.zeros(V)
    q_ids, q_p = list(range(V)), q.tolist()
    offered = range(n_children) if offered is None else offered
    for _ in range(trials):
        gumbel = -torch.log(-torch.log(torch.rand(V, generator=gen)))
        drawn = torch.topk(torch.log(q) + gumbel, n_children).indices.tolist()
        kids = [(i + 1, drawn[r]) for i, r in enumerate(offered)]
        tokens = drawn if draws_seen == "all" else [t for _, t in kids]
        _, y = dec._reject_sample(p_logits, Draws(q_ids, q_p, tokens), kids)
        counts[y] += 1
    expected = trials * torch.softmax(p_logits, -1)
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_keeps_the_target_distribution(tiny, monkeypatch, one_thread):
    """Recursive rejection over children drawn from q without replacement returns tokens distributed as
    p: chi-square over 6 tokens (5 dof) below 20.5 (p-value 0.001) with 6000 draws, fixed seeds. A verifier
    that forgets to subtract q from the residual fails the same test."""
    model, tok, prompts = tiny
    dec = Decoder(model, [], temperature=1.0, seed=0)
    dec.generator.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    p_logits = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, 0.8])
    q = torch.tensor([0.05, 0.40, 0.30, 0.10, 0.10, 0.05])
    assert _rejection_chi2(dec, p_logits, q, 2, 6000, gen) < 20.5

    def biased(self, logits_row, draws, kids):  # residual left as p: over-weights rejected children
        r = torch.softmax(logits_row / self.temperature, dim=-1)
        qd = torch.tensor(draws.q_probs)
        for row, t in kids:
            qi = qd / qd.sum()
            if torch.rand((), generator=self.generator) * qi[t] < r[t]:
                return row, t
            qd[t] = 0
        return None, int(torch.multinomial(r, 1, generator=self.generator))

    monkeypatch.setattr(Decoder, "_reject_sample", biased)
    assert _rejection_chi2(dec, p_logits, q, 2, 6000, gen) > 20.5


@pytest.mark.parametrize("offered", [[0, 1, 2, 4], [0, 2]])
def test_rejection_is_exact_when_the_tree_skips_ranks(offered):
    """A tree that keeps rank 4 of a parent's draws without rank 3 (a gapped shape): the verifier tests
    every draw in draw order, so its output is still distributed as p (chi-square, 5 dof, p = 0.001, 60000
    trials). Handing it only the offered children as if they were the draws, as it was handed before,
    biases the output: the same test fails."""
    p_logits = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, 0.8])
    q = torch.tensor([0.05, 0.40, 0.30, 0.10, 0.10, 0.05])
    stats = {}
    for seen in ("all", "offered"):
        dec = Decoder.__new__(Decoder)  # the verifier alone: no model needed
        dec.temperature, dec.generator = 1.0, torch.Generator().manual_seed(0)
        stats[seen] = _rejection_chi2(dec, p_logits, q, max(offered) + 1, 60000, torch.Generator().manual_seed(1),
                                      offered=offered, draws_seen=seen)
    print(f"ranks {offered}: chi2 {stats['all']:.1f} (every draw), {stats['offered']:.1f} (offered children only)")
    assert stats["all"] < 20.5 < stats["offered"], stats


class RandomQDrafter(Drafter):
    """Children of the root: k tokens drawn without replacement (Gumbel-Top-K, own RNG) from a fixed q,
    carried in Block.draws so the loop verifies them by rejection."""

    def __init__(self, q, k=4, seed=0):
        self.q, self.k, self.gen = q, k, torch.Generator().manual_seed(seed)

    def propose(self, tokens):
        gumbel = -torch.log(-torch.log(torch.rand(self.q.shape[0], generator=self.gen)))
        kids = torch.topk(torch.log(self.q) + gumbel, self.k).indices.tolist()
        block = tree_block([tokens[-1]] + kids, [-1] + [0] * self.k)
        block.draws = {0: Draws(list(range(self.q.shape[0])), self.q.tolist(), kids)}
        return block


def chi2_threshold(dof: int) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty)."""
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def test_rejection_end_to_end_matches_ar_distribution(tiny, one_thread):
    """The second generated token (the first one a decode step verifies) follows AR's exact marginal
    Σ_t1 p(t1) p(t2 | t1) at T = 1 when drafts come from q and are verified by rejection: chi-square over
    the tokens with >= 5 expected draws (+ the rest), 2000 seeded generations, p-value 0.001."""
    model, tok, prompts = tiny
    ids = prompts[2]
    V = model.config.vocab_size
    with torch.inference_mode():
        p1 = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        batch = torch.tensor([ids + [t] for t in range(V)])
        p2 = torch.softmax(model(batch).logits[:, -1].float(), -1)
    marginal = p1 @ p2
    n = 2000
    # q overlaps the target but differs from it: flattened, with noise
    noise = torch.exp(torch.randn(V, generator=torch.Generator().manual_seed(0)))
    drafter = RandomQDrafter((marginal.sqrt() * noise) / (marginal.sqrt() * noise).sum())
    counts = torch.zeros(V)
    accepted = 0
    for s in range(n):
        g = Decoder(model, [], temperature=1.0, seed=s).generate(drafter, ids, 3)
        counts[g.new_ids[1]] += 1
        accepted += g.committed_per_step[0] > 1
    expected = n * marginal
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_threshold(len(obs) - 1), (stat, len(obs))
    print(f"chi2 {stat:.1f} < {chi2_threshold(len(obs) - 1):.1f} ({len(obs)} bins), accepted {accepted}/{n}")
    assert accepted > 50  # drafts were accepted by the rejection rule, not only rejected
