"""The losslessness audit: whole-sequence comparison (length differences included), in-job and against
a separate AR job, non-zero exit on any difference; and a real job passes it."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.audit import audit, main
from mtp.metrics import first_mismatch

ROOT = Path(__file__).resolve().parent.parent


def test_first_mismatch_never_truncates():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2], [1, 2, 3]) == 2  # shorter: differs where it ends
    assert first_mismatch([1, 2, 3, 4], [1, 2, 3]) == 3
    assert first_mismatch([1, 5, 3], [1, 2, 3]) == 1
    assert first_mismatch([], [7]) == 0


def _job(root: Path, name: str, method: str, records: list[dict], complete=True, max_new_tokens=8):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"model": {"name": "tiny_llama", "dtype": "float32"}, "method": {"name": method},
           "task": {"name": "t", "path": "q.jsonl", "cache_dir": "/x"}, "max_new_tokens": max_new_tokens,
           "temperature": 0.0, "seed": 0}
    (d / "job.json").write_text(json.dumps({"fingerprint": name, "config": cfg}))
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if complete:
        (d / "summary.json").write_text("{}")
    return d


def rec(q, turn, ids, ar_ids=None, gap=None):
    r = {"question_id": q, "turn": turn, "ids": ids}
    if ar_ids is not None:
        r["ar_ids"] = ar_ids
        r["first_diff"] = None if ids == ar_ids else {"top2_gap": gap}
    return r


def test_identical_records_pass(tmp_path):
    _job(tmp_path, "ar", "ar", [rec(0, 0, [1, 2, 3]), rec(1, 0, [4, 5])])
    _job(tmp_path, "esp", "esp", [rec(0, 0, [1, 2, 3], [1, 2, 3]), rec(1, 0, [4, 5], [4, 5])])
    out = io.StringIO()
    assert audit(tmp_path, out=out) == 0
    text = out.getvalue()
    assert "[ok] esp: 2 turns against the in-job AR twin; 2 turns against AR job ar" in text
    assert "lossless: every audited turn is identical to AR" in text


def test_differences_are_reported_and_fail(tmp_path, capsys):
    _job(tmp_path, "ar", "ar", [rec(0, 0, [1, 2, 3]), rec(1, 0, [4, 5, 6])])
    # in-job: a truncated output (prefix of AR's) with its recorded gap; cross-job: a changed token
    _job(tmp_path, "pld", "pld", [rec(0, 0, [1, 2], [1, 2, 3], gap=0.25), rec(1, 0, [4, 9, 6], [4, 9, 6])],
         complete=False)
    with pytest.raises(SystemExit) as e:
        main(["--results", str(tmp_path)])
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert "[DEFECT] pld: 2 turns against the in-job AR twin; 2 turns against AR job ar; INCOMPLETE (2 turns recorded)" in text
    assert "in-job    question 0 turn 0: first difference at token 2 (method (ended), AR 3), top-2 logit gap 0.25: defect" in text
    assert "cross-job question 0 turn 0: first difference at token 2 (method (ended), AR 3)" in text
    assert "cross-job question 1 turn 0: first difference at token 1 (method 9, AR 5)" in text
    assert "3 differing turns: 3 defect" in text


def test_numeric_ties_are_reported_and_pass(tmp_path):
    """A bf16 job whose only difference is a numeric tie (classified when it was recorded) passes the audit."""
    tie = rec(0, 0, [1, 7], [1, 2], gap=0.0625)
    tie["first_diff"] |= {"position": 1, "method_token": 7, "ar_token": 2, "top2_tokens": [2, 7], "class": "numeric_tie"}
    _job(tmp_path, "esp", "esp", [tie, rec(1, 0, [4, 5], [4, 5])])
    out = io.StringIO()
    assert audit(tmp_path, out=out) == 0
    text = out.getvalue()
    assert "[NUMERIC TIES] esp" in text and "top-2 logit gap 0.0625: numeric_tie" in text
    assert "1 differing turns: 1 numeric_tie" in text


def test_jobs_without_any_reference_are_unchecked(tmp_path):
    _job(tmp_path, "esp", "esp", [rec(0, 0, [1, 2])])  # compare_ar=false, no AR job
    _job(tmp_path, "ar", "ar", [rec(0, 0, [1, 2])], max_new_tokens=16)  # another setting: not comparable
    out = io.StringIO()
    assert audit(tmp_path, out=out) == 0
    assert "[UNCHECKED] esp: 0 turns against the in-job AR twin; no separate AR job" in out.getvalue()
    assert "1 jobs UNCHECKED" in out.getvalue()


def test_a_real_job_and_an_ar_job_pass_the_audit(tmp_path):
    common = ["model=tiny_llama", "task.limit=2", "max_new_tokens=12", "wandb.mode=disabled"]
    for method in ("ar", "pld"):
        p = subprocess.run([sys.executable, "run.py", f"method={method}", *common,
                            f"hydra.run.dir={tmp_path}/{method}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "experiments.audit", "--results", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "turns against the in-job AR twin; 3 turns against AR job ar" in p.stdout

    # a changed token in the method's records: found in-job and cross-job; --gap loads the model for the
    # cross-job top-2 gap at that position
    recs = (tmp_path / "pld" / "records.jsonl").read_text().splitlines()
    first = json.loads(recs[0])
    first["ids"][5] = (first["ids"][5] + 1) % 256
    (tmp_path / "pld" / "records.jsonl").write_text("\n".join([json.dumps(first), *recs[1:]]) + "\n")
    p = subprocess.run([sys.executable, "-m", "experiments.audit", "--results", str(tmp_path), "--gap"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"in-job    question {first['question_id']} turn 0: first difference at token 5" in p.stdout
    line = next(x for x in p.stdout.splitlines() if "cross-job" in x)
    assert "first difference at token 5" in line and "top-2 logit gap" in line
