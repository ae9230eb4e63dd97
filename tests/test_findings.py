"""The findings table: verdicts from paired intervals, the turns an unresolved claim would need, and one command
that runs the sweeps the claims need and writes the table (on a tiny model)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from experiments.findings import EXPERIMENTS, invocations, late_layer_gap, turns_to_resolve, verdict

ROOT = Path(__file__).resolve().parent.parent


def test_verdicts_follow_the_interval_not_the_point():
    assert verdict(1.2, [1.05, 1.3], "gt") == "holds"
    assert verdict(1.2, [0.95, 1.3], "gt") == "unresolved"  # the point is above 1, the interval is not
    assert verdict(0.9, [0.8, 0.97], "gt") == "contradicted"
    assert verdict(0.9, [0.8, 0.97], "lt") == "holds" and verdict(1.1, [1.02, 1.2], "lt") == "contradicted"
    assert verdict(1.0, [0.98, 1.02], "approx") == "holds"
    assert verdict(1.0, [0.95, 1.02], "approx") == "unresolved"
    assert verdict(1.1, [1.05, 1.15], "approx") == "contradicted"
    assert verdict(0.1, [0.02, 0.2], "gt", threshold=0.0) == "holds"
    assert verdict(1.5, None, "gt") == "unresolved"  # one turn: no interval, no verdict
    assert verdict(0.8, [0.8, 0.8], "gt", n=2) == "unresolved"  # two equal turns: a zero-width interval, no verdict


def test_turns_to_resolve_scale_as_one_over_root_n():
    # half-width 0.1 at 1.05: the interval must shrink by half, i.e. 4x the turns
    assert turns_to_resolve(1.05, [0.95, 1.15], 26, "gt") == 104
    assert turns_to_resolve(1.2, [1.05, 1.35], 26, "gt") is None  # resolved already
    assert turns_to_resolve(1.0, [0.9, 1.1], 26, "gt") == math.inf  # no effect: no sample size resolves it
    # approx: the distance is to the nearer edge of 1 ± 3%: 0.02 from 1.01, half-width 0.04 -> 4x
    assert turns_to_resolve(1.01, [0.97, 1.05], 10, "approx") == 40
    assert turns_to_resolve(1.2, [1.1, 1.3], 3, "gt") == 10  # resolved but on too few turns: at least MIN_TURNS


def test_late_layer_gap_is_accepted_minus_rejected_with_an_interval():
    rng = np.random.default_rng(0)
    rows = []
    for t in range(12):  # 3 layers + embeddings; accepted slots align better in the last layer only
        acc = [True, False, True, False]
        cos = [[0.1, 0.2, 0.3, 0.5 if a else 0.3] for a in acc]
        cos = (np.array(cos) + rng.normal(0, 0.01, (4, 4))).tolist()
        rows.append({"question_id": t, "turn": 0, "cos": cos, "accepted": acc})
    g = late_layer_gap(rows)
    assert g["layers"] == (2, 3) and g["n_turns"] == 12
    assert abs(g["ratio"] - 0.1) < 0.02 and 0.05 < g["ci"][0] < g["ci"][1] < 0.15


def test_every_sweep_is_narrowed_to_the_scale_and_lands_in_its_own_folder(tmp_path):
    inv = invocations(["task.per_category=2"], tmp_path)
    assert [e for e, _ in inv] == [e for e, parts in EXPERIMENTS.items() for _ in parts]
    for exp, args in inv:
        assert args[0] == f"experiment={exp}" and "model=smollm2_135m" in args
        assert args.index("task.per_category=2") > args.index("task.per_category=1")  # the user's overrides win
        assert args[-1] == f"hydra.sweep.dir={tmp_path.resolve() / exp}"


def test_findings_command_runs_its_sweeps_and_writes_the_table(tmp_path):
    """The one command on a tiny model: every sweep runs, and each claim the runs can test gets a row with a
    measured effect and a verdict (a tiny random model's verdicts mean nothing; the rows must be there)."""
    out = tmp_path / "findings"
    p = subprocess.run([sys.executable, "-m", "experiments.findings", "--results", str(out), "model=tiny_llama",
                        "task.per_category=1", "task.categories=[writing,summarization,rag]", "max_new_tokens=6",
                        "wandb.mode=disabled"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (out / "report" / "findings.md").read_text()
    for claim in ("ESP τ > rival τ (Table 1)", "ESP τ rises with bc (Table 1)", "3 masks hurt (Table 3)",
                  "mean ≥ sample ≥ last-k init (Table 5)", "dynamic ≈ best static tree (Table 2)",
                  "pruner raises τ", "efficient faster than naive (Table 4)",
                  "copy methods win on summarization / RAG", "accepted masks align more in late layers"):
        assert claim in md, claim
    rows = [line for line in md.splitlines() if line.startswith("| ") and "tiny_llama" in line]
    assert len(rows) >= 20 and all(any(v in r for v in ("holds", "contradicted", "unresolved")) for r in rows)
    assert (out / "report" / "table1_pairs.md").exists()
    assert "| tiny_llama | 30 |" in (out / "report" / "table1_pairs.md").read_text()
    assert json.loads(next((out / "table2_dynamic").rglob("summary.json")).read_text())["config"]["bc"] == 60
