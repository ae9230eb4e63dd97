"""Losslessness audit: every method's output ids against AR's, turn by turn, in full.

    python -m experiments.audit --results results            # exit 1 on any defect
    python -m experiments.audit --results results --gap      # + top-2 logit gaps of cross-job differences

Two comparisons for each job folder (a `records.jsonl` beside its `job.json`):
- **in-job**: each turn's `ids` against the AR twin's `ar_ids` generated in the same job;
- **cross-job**: against the records of a separate `method=ar` job whose config is the same but for the
  method's own settings (`mtp.runner.fingerprint` without `NOT_IN_AR_OUTPUT`: the same model, dtype, task,
  max_new_tokens, temperature, seed; if there is one under `--results`).
Ids are compared whole: a shorter or longer output is a difference at the first position one of them
lacks (never a zip-truncated match). Each difference is reported with its first position, both tokens
and the model's top-2 logit gap there (from the record for in-job differences; `--gap` loads the model
to compute it for cross-job ones), so a near-tie shows as a tiny gap. Incomplete jobs are audited on the
turns they have and said to be incomplete; turns only one side has are listed, not compared.
Each difference carries its class (`mtp.lossless`): a numeric tie (bf16/fp16: AR's top two within the
dtype's rounding, the method took the other), a defect, or a turn after an earlier divergence. A cross-job
difference is classified only with `--gap` (without it, it counts as a defect). The exit status is 1 when
any difference is a defect.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtp.metrics import first_mismatch
from mtp.runner import NOT_IN_AR_OUTPUT, fingerprint, read_records


def _jobs(root: Path) -> list[dict]:
    jobs = []
    for rec_file in sorted(root.rglob("records.jsonl")):
        job_file = rec_file.parent / "job.json"
        if not job_file.exists():
            continue
        cfg = json.loads(job_file.read_text())["config"]
        records, _ = read_records(rec_file)  # up to a torn last line of a killed job
        key = fingerprint(cfg, without=NOT_IN_AR_OUTPUT)  # what AR's output depends on: the same key, comparable
        jobs.append({"dir": rec_file.parent, "config": cfg, "key": key, "records": records,
                     "complete": (rec_file.parent / "summary.json").exists(), "method": cfg["method"]["name"]})
    return jobs


def _gap_fn(job: dict):
    """(turn record, AR record) -> top-2 gap at the first difference, with the job's model loaded once."""
    from omegaconf import OmegaConf

    from mtp.data import load_questions
    from mtp.models import chat_ids, load_model
    from mtp.runner import first_difference

    cfg = OmegaConf.create(job["config"])
    model, tok = load_model(cfg.model)
    questions = {str(q.question_id): q for q in load_questions(cfg.task)}

    def gap(rec: dict, ar: dict, ar_records: dict) -> dict | None:
        q = questions.get(str(rec["question_id"]))
        if q is None:
            return None
        history = []
        for t in range(rec["turn"]):  # the prompt AR saw: earlier turns with AR's answers
            history += [{"role": "user", "content": q.turns[t]},
                        {"role": "assistant", "content": tok.decode(ar_records[(str(q.question_id), t)]["ids"],
                                                                    skip_special_tokens=True)}]
        history.append({"role": "user", "content": q.turns[rec["turn"]]})
        prompt = chat_ids(tok, history, cfg.model.get("thinking"))
        return first_difference(model, prompt, rec["ids"], ar["ids"])

    return gap


def audit(root: Path, with_gap: bool = False, out=None) -> int:
    """Prints one block per method job; returns the number of defects (differences that are not numeric ties
    or after an earlier divergence; 0 = lossless)."""
    out = out or sys.stdout
    jobs = _jobs(root)
    if not jobs:
        raise SystemExit(f"no job records (records.jsonl + job.json) under {root}")
    ar_jobs = {}
    for j in jobs:
        if j["method"] == "ar":
            ar_jobs.setdefault(j["key"], j)
    totals, unchecked = {}, 0
    for job in (j for j in jobs if j["method"] != "ar"):
        label = str(job["dir"].relative_to(root)) if job["dir"] != root else str(root)
        lines, classes = [], {}
        # in-job: against the AR twin of the same turn
        # random drafts at T > 0 (lossless_check "distribution"): ids differ from AR's by design, not compared
        by_distribution = [r for r in job["records"] if r.get("lossless_check") == "distribution"]
        twins = [r for r in job["records"] if "ar_ids" in r and r.get("lossless_check") != "distribution"]
        for r in twins:
            pos = first_mismatch(r["ids"], r["ar_ids"])
            if pos is not None:
                fd = r.get("first_diff") or {}
                gap, cls = fd.get("top2_gap"), fd.get("class") or "defect"
                classes[cls] = classes.get(cls, 0) + 1
                lines.append(f"    in-job    question {r['question_id']} turn {r['turn']}: first difference at token "
                             f"{pos} (method {_at(r['ids'], pos)}, AR {_at(r['ar_ids'], pos)})"
                             + (f", top-2 logit gap {gap:.3g}" if gap is not None else
                                f", {fd['reason']}" if fd.get("reason") else "") + f": {cls}")
        # cross-job: against a separate AR job of the same setting
        ar = ar_jobs.get(job["key"])
        cross, only_one_side = 0, 0
        if ar is not None and not by_distribution:
            ar_recs = {(str(r["question_id"]), r["turn"]): r for r in ar["records"]}
            mine = {(str(r["question_id"]), r["turn"]): r for r in job["records"]}
            only_one_side = len(set(ar_recs) ^ set(mine))
            gap_fn = None
            for k in sorted(set(ar_recs) & set(mine), key=lambda k: (k[0], k[1])):
                cross += 1
                pos = first_mismatch(mine[k]["ids"], ar_recs[k]["ids"])
                if pos is None:
                    continue
                extra, cls = "", "defect"
                if with_gap:
                    gap_fn = gap_fn or _gap_fn(job)
                    fd = gap_fn(mine[k], ar_recs[k], ar_recs)
                    extra = f", top-2 logit gap {fd['top2_gap']:.3g}" if fd else ""
                    cls = fd["class"] if fd else "defect"
                classes[cls] = classes.get(cls, 0) + 1
                lines.append(f"    cross-job question {k[0]} turn {k[1]}: first difference at token {pos} "
                             f"(method {_at(mine[k]['ids'], pos)}, AR {_at(ar_recs[k]['ids'], pos)}){extra}: {cls}"
                             + ("" if with_gap else " (unclassified without --gap)"))
        diffs = sum(classes.values())
        status = (("DEFECT" if classes.get("defect") else "NUMERIC TIES" if diffs else "ok") if twins or cross
                  else "IN DISTRIBUTION" if by_distribution else "UNCHECKED")
        unchecked += not (twins or cross or by_distribution)
        if by_distribution:
            lines.append(f"    {len(by_distribution)} turns drafted with random draws at T > 0: their ids differ from AR's by "
                         "design, and their distribution is the target's (tested by chi-square in tests/), not compared here")
        where = f"; {cross} turns against AR job {ar['dir'].relative_to(root) if ar['dir'] != root else root}" if ar else "; no separate AR job"
        print(f"[{status}] {label}: {len(twins)} turns against the in-job AR twin{where}"
              + ("" if job["complete"] else f"; INCOMPLETE ({len(job['records'])} turns recorded)")
              + (f"; {only_one_side} turns only one side has" if only_one_side else ""), file=out)
        if diffs:
            lines.insert(0, "    " + ", ".join(f"{n} {c}" for c, n in sorted(classes.items())))
        for line in lines:
            print(line, file=out)
        for c, n in classes.items():
            totals[c] = totals.get(c, 0) + n
    n_diff = sum(totals.values())
    print(f"{n_diff} differing turns: " + ", ".join(f"{n} {c}" for c, n in sorted(totals.items())) if n_diff
          else "lossless: every audited turn is identical to AR", file=out)
    if unchecked:
        print(f"{unchecked} jobs UNCHECKED: run with compare_ar=true, or put a method=ar job of the same setting "
              f"under {root}", file=out)
    return totals.get("defect", 0)


def _at(ids: list[int], pos: int):
    return ids[pos] if pos < len(ids) else "(ended)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results"), help="folder searched for job records")
    ap.add_argument("--gap", action="store_true", help="load the model to give cross-job differences their top-2 gap")
    args = ap.parse_args(argv)
    sys.exit(1 if audit(args.results, args.gap) else 0)


if __name__ == "__main__":
    main()
