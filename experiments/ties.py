"""How far rounding moves a logit between the loop's forwards, per dtype: the measurement behind
`mtp.lossless.TIE_TOLERANCE`.

A method scores its drafts with one tree forward of bc rows; AR scores the same position with a one-token
forward on a cache it grew one token at a time; the divergence check (`mtp.runner.first_difference`)
recomputes AR's logits with one forward over the whole prefix. In exact arithmetic the three agree. In a
low-precision dtype they round differently, so where AR's top two logits nearly tie the method may take the
other one. For each prompt this measures, at every generated position, the largest |logit difference| over
the vocabulary between
- the tree forward (the greedy continuation as a chain from a root, beside random sibling rows filling bc)
  and the sequential one-token forwards, and
- the one forward over the whole prefix and the sequential forwards,
and how far each moves the gap between AR's top two tokens (what decides a flip), with maxima and
percentiles. A method's token can differ from AR's by rounding alone only where AR's top-2 gap is within the
tree's shift of that gap; the check sees the gap moved by the recompute's shift; so a divergence whose
recomputed gap exceeds the sum of the two largest shifts (`tie_gap_bound`) is not a rounding tie. The
vocabulary-wide largest |logit difference| is reported beside it: it comes from tokens far from the top
and says how coarse the dtype is.

    python -m experiments.ties model=smollm2_135m model.dtype=bfloat16
    python -m experiments.ties model=smollm2_135m model.dtype=float16 --prompts 6 --out /tmp/ties.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mtp.cli import compose
from mtp.data import load_questions
from mtp.kv import new_cache, with_cache
from mtp.loop import Decoder, Drafter, tree_block
from mtp.models import chat_ids, load_model, stop_ids


@torch.inference_mode()
def sequential_logits(model, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """(len(new_ids), V) fp32: the logits that predicted each generated token, as AR computes them (the
    prefill's last row, then one-token forwards on a growing cache)."""
    device = next(model.parameters()).device
    cache = new_cache(model.config, len(prompt_ids) + len(new_ids) + 1)
    rows = [model(input_ids=torch.tensor([prompt_ids], device=device), **with_cache(model, cache)).logits[0, -1]]
    for tok in new_ids[:-1]:
        rows.append(model(input_ids=torch.tensor([[tok]], device=device), **with_cache(model, cache)).logits[0, -1])
    return torch.stack(rows).float()


@torch.inference_mode()
def recomputed_logits(model, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """The same rows from one forward over the whole prefix (the divergence check's path)."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([prompt_ids + new_ids[:-1]], device=device)).logits[0].float()
    return logits[len(prompt_ids) - 1:]


@torch.inference_mode()
def tree_logits(decoder: Decoder, prompt_ids: list[int], new_ids: list[int], bc: int, depth: int,
                rng: np.random.Generator) -> dict[int, torch.Tensor]:
    """Logits of the generated positions scored by tree forwards as the loop runs them: from roots every
    `depth` tokens, a block of the next `depth` true tokens as a chain (root first), the rest of the bc rows
    random tokens hung under random chain rows. {index into new_ids: (V,) logits that predicted it}."""
    model, V = decoder.model, decoder.model.config.vocab_size
    out = {}
    for r in range(0, len(new_ids) - 1, depth):
        prefix = prompt_ids + new_ids[:r]  # the root new_ids[r] is not in the cache yet, as in the loop
        cache = new_cache(model.config, len(prefix) + bc)
        model(input_ids=torch.tensor([prefix], device=decoder.device), **with_cache(model, cache))
        chain = new_ids[r: r + depth]
        ids, parents = list(chain), list(range(-1, len(chain) - 1))
        while len(ids) < bc:
            parents.append(int(rng.integers(0, len(chain))))  # a chain row: it precedes every sibling
            ids.append(int(rng.integers(0, V)))
        logits, _ = decoder._forward(tree_block(ids, parents), cache, len(prefix))
        for j in range(len(chain)):
            if r + j + 1 < len(new_ids):
                out[r + j + 1] = logits[j]
    return out


def measure(model, tok, prompts: list[list[int]], n_tokens: int, bc: int, seed: int = 0) -> dict:
    decoder = Decoder(model, stop_ids(model, tok))
    rng = np.random.default_rng(seed)
    d = {k: [] for k in ("tree_logit", "tree_gap", "recompute_logit", "recompute_gap")}

    def gap_shift(row, ref):  # how far the row moves the gap between the reference's top two tokens
        a, b = torch.topk(ref, 2).indices
        return float(((row[a] - row[b]) - (ref[a] - ref[b])).abs())

    for ids in prompts:
        new = decoder.generate(Drafter(), ids, n_tokens).new_ids
        if len(new) < 2:
            continue
        seq = sequential_logits(model, ids, new)
        full = recomputed_logits(model, ids, new)
        d["recompute_logit"] += (full - seq).abs().amax(1).tolist()
        d["recompute_gap"] += [gap_shift(full[i], seq[i]) for i in range(len(new))]
        for i, row in tree_logits(decoder, ids, new, bc, depth=min(8, bc), rng=rng).items():
            d["tree_logit"].append(float((row - seq[i]).abs().max()))
            d["tree_gap"].append(gap_shift(row, seq[i]))

    def stats(v):
        v = np.array(v)
        return {"n": int(len(v)), "max": float(v.max()), "p99": float(np.percentile(v, 99)),
                "p50": float(np.percentile(v, 50))}

    res = {k: stats(v) for k, v in d.items()}
    # a flip needs AR's gap within the tree's shift of it; the check sees that gap moved by the recompute's shift
    res["tie_gap_bound"] = res["tree_gap"]["max"] + res["recompute_gap"]["max"]
    return res


def tie_prompts(overrides: list[str], n: int):
    """(config, model, tokenizer, prompt ids) of a tie measurement: the first turns of the first eval question of
    each Spec-Bench category, the first `n` of them, with the model the overrides name."""
    cfg = compose(["task=spec_bench", "task.per_category=1", *overrides])
    model, tok = load_model(cfg.model)
    questions = load_questions(cfg.task)[:n]
    prompts = [chat_ids(tok, [{"role": "user", "content": q.turns[0]}], cfg.model.get("thinking")) for q in questions]
    return cfg, model, tok, prompts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model=smollm2_135m model.dtype=bfloat16")
    ap.add_argument("--prompts", type=int, default=13, help="first turns of the first question of each category")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--bc", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg, model, tok, prompts = tie_prompts(args.overrides, args.prompts)
    res = measure(model, tok, prompts, args.max_new_tokens, args.bc) | {
        "model": cfg.model.name, "dtype": cfg.model.dtype, "device": str(next(model.parameters()).device),
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "bc": args.bc,
        "torch": torch.__version__, "command": "python -m experiments.ties " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
