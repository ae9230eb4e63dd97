"""Figure 2 / Lemma 3.1 of the ESP paper: how well a mask's hidden state aligns with the true token's.

For every generated position q, the mask sits in the slot of x_{s+1} = seq[q] (position q, attending to
seq[:q] and itself) and the true token x_{s+1} sits in the same slot; both predict x_{s+2} = seq[q+1].
Per layer, the cosine similarity of their hidden states is recorded, split by whether the mask's top-1
is x_{s+2} ("accepted": the draft it proposes would be accepted) or not ("rejected"). Lemma 3.1 says a
high enough similarity puts x_{s+2} in the mask's Top-K; the summary measures that per similarity bin.

The analysis is teacher-forced on the greedy continuation, one forward per prompt turn: the true
sequence and all of its masks go through the model together, each mask row seeing exactly the prefix
it sees during decoding (the root's masks of the step whose root is x_s, at the same position, with
the same embedding). The mask embedding comes from the ESP drafter's own mask component
(`mtp.masks.MaskEmbeddings`: its init and per-token EMA, `method.ema=token`), so this is the decoder's mask
state, not a re-derivation.

    python run.py experiment=fig2 model=smollm2_135m     # writes alignment.jsonl + alignment.json
    python -m experiments.report --results results/fig2  # the figure
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mtp.data import load_questions
from mtp.errors import ConfigError
from mtp.esp import ESP
from mtp.kv import layer_masks
from mtp.loop import Decoder, Drafter
from mtp.masks import MaskEmbeddings
from mtp.models import chat_ids, load_model, stop_ids
from mtp.runner import build_drafter, environment, validate, write_atomic

N_BINS = 10  # similarity bins of the Lemma 3.1 check


def mask_states(masks: MaskEmbeddings, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """(len(new_ids), H): the first mask's embedding in the slot of each generated token, i.e. the mask
    state after the init from the prompt and the EMA over the generated tokens before that slot."""
    masks.start(prompt_ids)
    states = [masks.vectors[0].clone()]
    for tok in new_ids[:-1]:
        masks.update([tok])
        states.append(masks.vectors[0].clone())
    return torch.stack(states)


@torch.inference_mode()
def mask_forward(model, masks: MaskEmbeddings, prompt_ids: list[int], new_ids: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """One forward of `[prompt + new_ids | a mask per slot]`. Returns the slots q (positions of
    x_{s+1} = seq[q], each with a known next token), the per-layer cosine (layers + 1, slots) of the
    mask vs the true token in each slot (layer 0 = input embeddings), and the masks' logits (slots, V)."""
    t, seq = len(prompt_ids), list(prompt_ids) + list(new_ids)
    slots = list(range(t, len(seq) - 1))
    embed = model.get_input_embeddings()
    dtype, device = embed.weight.dtype, embed.weight.device
    if not slots:
        return slots, torch.empty(0, 0), torch.empty(0, embed.weight.shape[0])
    n, m = len(seq), len(slots)
    rows = mask_states(masks, prompt_ids, new_ids)[:m].to(device, dtype)
    embeds = torch.cat([embed(torch.tensor(seq, device=device)), rows])[None]
    q = torch.tensor(slots, device=device)
    position_ids = torch.cat([torch.arange(n, device=device), q])[None]  # a mask shares its slot's position
    allowed = torch.zeros(n + m, n + m, dtype=torch.bool, device=device)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    allowed[n:, :n] = torch.arange(n, device=device)[None] < q[:, None]  # the mask in slot q sees seq[:q]
    allowed[n + torch.arange(m), n + torch.arange(m)] = True  # and itself
    mask = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=device).masked_fill(allowed, 0.0)
    masks = layer_masks(model.config, mask[None, None], position_ids[0], 0)
    out = model(inputs_embeds=embeds, attention_mask=masks, position_ids=position_ids,
                output_hidden_states=True, use_cache=False)
    hs = torch.stack([h[0].float() for h in out.hidden_states])  # (layers + 1, n + m, H)
    cos = torch.nn.functional.cosine_similarity(hs[:, q], hs[:, n:], dim=-1)
    return slots, cos, out.logits[0, n:].float()


def align_turn(model, masks: MaskEmbeddings, prompt_ids: list[int], new_ids: list[int], top_k: int) -> dict:
    """Per slot: per-layer cosine of mask vs true hidden state, whether the mask's top-1 is the true
    next token x_{s+2}, whether x_{s+2} is in the mask's Top-K, and its rank among the mask's logits."""
    slots, cos, logits = mask_forward(model, masks, prompt_ids, new_ids)
    if not slots:
        return {"cos": [], "accepted": [], "in_top_k": [], "rank": []}
    target = torch.tensor(new_ids[1:], device=logits.device)
    rank = (logits > logits.gather(1, target[:, None])).sum(1)  # 0 = the mask's top-1
    return {"cos": cos.T.tolist(), "accepted": (rank == 0).tolist(), "in_top_k": (rank < top_k).tolist(),
            "rank": rank.tolist()}


def summarize_alignment(rows: list[dict], top_k: int) -> dict:
    """Mean per-layer cosine of accepted and rejected slots, and Lemma 3.1's check at the last layer:
    P(x_{s+2} in Top-K) per similarity bin, and the smallest threshold above which it always holds."""
    cos = np.array([c for r in rows for c in r["cos"]])  # (slots, layers + 1)
    acc = np.array([a for r in rows for a in r["accepted"]], dtype=bool)
    in_k = np.array([a for r in rows for a in r["in_top_k"]], dtype=bool)
    if len(cos) == 0:
        return {"n_slots": 0}

    def curve(sel):
        if not sel.any():
            return None, None
        c = cos[sel]
        return c.mean(0).tolist(), (c.std(0) / np.sqrt(len(c))).tolist()

    acc_mean, acc_se = curve(acc)
    rej_mean, rej_se = curve(~acc)
    last = cos[:, -1]
    edges = np.linspace(last.min(), last.max(), N_BINS + 1)
    which = np.clip(np.digitize(last, edges) - 1, 0, N_BINS - 1)
    bins = [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int((which == b).sum()),
             "p_in_top_k": float(in_k[which == b].mean()) if (which == b).any() else None} for b in range(N_BINS)]
    # delta*: the smallest similarity from which on every slot had x_{s+2} in the Top-K (None if even
    # the most similar slot missed)
    order = np.argsort(-last)
    misses = np.nonzero(~in_k[order])[0]
    first_miss = misses[0] if len(misses) else len(order)
    delta = float(last[order[first_miss - 1]]) if first_miss > 0 else None
    return {
        "n_slots": int(len(cos)), "n_accepted": int(acc.sum()), "n_rejected": int((~acc).sum()),
        "top1_rate": float(acc.mean()), "top_k": top_k, "top_k_rate": float(in_k.mean()),
        "layers": int(cos.shape[1] - 1),
        "cos_accepted": acc_mean, "cos_accepted_se": acc_se, "cos_rejected": rej_mean, "cos_rejected_se": rej_se,
        "last_layer_bins": bins, "delta_star": delta,
        "slots_at_or_above_delta_star": int(first_miss),
    }


def run_alignment(cfg, out_dir: Path) -> dict:
    """The `job=alignment` job: greedy continuations of the task's prompts (AR), then the teacher-forced
    alignment of each turn. Writes `alignment.jsonl` (a row per turn, flushed) and `alignment.json`."""
    validate(cfg)
    questions = load_questions(cfg.task)
    drafter = build_drafter(cfg)
    if not isinstance(drafter, ESP):
        raise ConfigError(f"job=alignment analyses ESP's masks; method={cfg.method.name} has none (use method=esp)")
    if drafter.masks.ema != "token":
        raise ConfigError("job=alignment needs method.ema=token: with per-step EMA the mask state depends on "
                          "how tokens were grouped into steps, which a teacher-forced pass does not know")
    top_k = drafter.widths[0] if drafter.tree == "static" else drafter.budget - 1
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(cfg.model)
    drafter.setup(model)
    decoder = Decoder(model, stop_ids(model, tok))
    thinking = cfg.model.get("thinking")
    rows = []
    n_turns = sum(len(q.turns) for q in questions)
    bar = tqdm(total=n_turns, desc=f"{cfg.model.name} alignment", unit="turn", file=sys.stderr)
    with open(out_dir / "alignment.jsonl", "w") as f:
        for q in questions:
            history = []
            for turn, text in enumerate(q.turns):
                history.append({"role": "user", "content": text})
                ids = chat_ids(tok, history, thinking)
                new = decoder.generate(Drafter(), ids, cfg.max_new_tokens).new_ids
                row = {"question_id": q.question_id, "category": q.category, "turn": turn, "prompt_tokens": len(ids)}
                row |= align_turn(model, drafter.masks, ids, new, top_k)
                f.write(json.dumps(row) + "\n")
                f.flush()
                rows.append(row)
                history.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
                bar.update(1)
    bar.close()
    summary = summarize_alignment(rows, top_k) | {
        "job": "alignment", "model": cfg.model.name, "method": cfg.method.name, "task": cfg.task.name,
        "bc": cfg.bc, "max_new_tokens": cfg.max_new_tokens, "n_turns": len(rows),
        "environment": environment(model), "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_atomic(out_dir / "alignment.json", json.dumps(summary, indent=2))
    return summary


def load_alignment(root: str | Path) -> list[dict]:
    """Every alignment summary under `root`, with its directory."""
    return [json.loads(p.read_text()) | {"dir": str(p.parent)} for p in sorted(Path(root).rglob("alignment.json"))]


def format_alignment(s: dict, out_dir: Path) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    acc, rej = s.get("cos_accepted"), s.get("cos_rejected")
    return "\n".join([
        f"== {s['model']} · alignment of ESP masks (bc={s['bc']}) · {s['task']} ({s['n_turns']} turns, "
        f"max_new_tokens={s['max_new_tokens']})",
        f"  slots                 {s['n_slots']} ({s.get('n_accepted', 0)} mask top-1 = true token, "
        f"{s.get('n_rejected', 0)} not)",
        f"  true token in Top-{s.get('top_k')}   {f(s.get('top_k_rate'))}",
        f"  last-layer cosine     accepted {f(acc[-1] if acc else None)}, rejected {f(rej[-1] if rej else None)}",
        f"  delta* (last layer)   {f(s.get('delta_star'))}  (every slot at or above it had the true token in Top-K)",
        f"  output                {out_dir}",
    ])
