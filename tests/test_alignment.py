"""Figure 2's teacher-forced mask analysis reproduces the decoder's own mask rows."""

import json

import pytest
import torch

from experiments.alignment import align_turn, mask_forward, summarize_alignment
from mtp.esp import ESP
from tests.conftest import decode

N_NEW = 24


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_teacher_forced_masks_equal_the_decoders_root_masks(tiny, one_thread, lam):
    """At every step the decoder's root mask (slot len(tokens)) has the logits the one-pass analysis
    computes for that slot: same prefix, position and EMA state."""
    model, _, prompts = tiny
    seen = {}  # slot -> logits of mask 1 of the root in the decoder's forward

    class Recording(ESP):
        def observe_prefill(self, probe_logits, root, root_logits):
            seen[len(self._prompt)] = probe_logits[0].clone()
            super().observe_prefill(probe_logits, root, root_logits)

        def start(self, prompt_ids):
            self._prompt = list(prompt_ids)
            return super().start(prompt_ids)

        def propose(self, tokens):
            self._slot = len(tokens)  # the root x_s sits at len(tokens) - 1, its mask one further
            return super().propose(tokens)

        def observe(self, step):
            seen[self._slot] = step.logits[step.block.n_tree].clone()
            super().observe(step)

    drafter = Recording(bc=10, lam=lam)
    gen = decode(model, drafter, prompts[0], n=N_NEW)
    analysis = ESP(bc=10, lam=lam)
    analysis.setup(model)
    slots, cos, logits = mask_forward(model, analysis.masks, prompts[0], gen.new_ids)
    assert slots == list(range(len(prompts[0]), len(prompts[0]) + N_NEW - 1))
    assert cos.shape == (model.config.num_hidden_layers + 1, len(slots))
    compared = [q for q in seen if q in slots]
    assert len(compared) >= 3
    for q in compared:
        torch.testing.assert_close(logits[slots.index(q)], seen[q], atol=1e-4, rtol=1e-4)


def test_a_mask_equal_to_the_true_token_is_perfectly_aligned(tiny, one_thread):
    """Layer-0 cosine compares input embeddings: with the mask forced to a slot's true token embedding,
    that slot's layer-0 cosine is 1, and all layers are 1 when the mask also sees the same prefix."""
    model, _, prompts = tiny
    drafter = ESP(bc=10)
    drafter.setup(model)
    new = decode(model, ESP(bc=10), prompts[1], n=8).new_ids

    masks = drafter.masks

    def probe(ids):  # the mask state of slot t is e(x_{t}), the embedding of that slot's true token
        masks.vectors = masks.embed([new[0]]).clone()
        return masks.rows(1)

    masks.start = probe
    masks.lam = 0.0  # and it stays there
    slots, cos, _ = mask_forward(model, masks, prompts[1], new)
    torch.testing.assert_close(cos[:, 0], torch.ones(cos.shape[0]), atol=1e-5, rtol=0)
    others = [j for j in range(1, len(slots)) if new[j] != new[0]]  # slots holding another token
    assert others and all(cos[0, j] < 1 - 1e-3 for j in others)


def test_summary_splits_accepted_and_checks_lemma(tiny, one_thread):
    model, _, prompts = tiny
    drafter = ESP(bc=10)
    drafter.setup(model)
    rows = []
    for ids in prompts:
        new = decode(model, ESP(bc=10), ids, n=N_NEW).new_ids
        rows.append(align_turn(model, drafter.masks, ids, new, top_k=4))
    s = summarize_alignment(rows, top_k=4)
    assert s["n_slots"] == 3 * (N_NEW - 1) == s["n_accepted"] + s["n_rejected"]
    ranks = [r for row in rows for r in row["rank"]]
    assert s["top1_rate"] == pytest.approx(sum(r == 0 for r in ranks) / len(ranks))
    assert s["top_k_rate"] == pytest.approx(sum(r < 4 for r in ranks) / len(ranks))
    assert sum(b["n"] for b in s["last_layer_bins"]) == s["n_slots"]
    if s["delta_star"] is not None:  # every slot at or above delta* has the true token in its Top-K
        last = [c[-1] for row in rows for c in row["cos"]]
        ink = [x for row in rows for x in row["in_top_k"]]
        assert all(k for c, k in zip(last, ink) if c >= s["delta_star"])
    json.dumps(s)  # written as alignment.json
