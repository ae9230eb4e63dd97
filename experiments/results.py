"""Load job outputs (`summary.json`, `records.jsonl`, `error.json`) under a results folder into pandas.

A run is identified by its fingerprint (`mtp.runner.fingerprint`: a hash of its whole config, written into
summary.json) within its experiment group, so two runs that differ in any option are two rows, and so is the
same job run by two experiments (each experiment's table has it); when the same job was run more than once for
one experiment, the newest summary wins. Summaries older than the fingerprint fall back to (experiment group, model,
method, bc, sweep arm, every method option). Method options are columns `m_<key>`. Failed jobs (an `error.json` and no summary) are kept with
status "failed" so tables can say what is missing instead of averaging over it; jobs on a shape model with
random weights (`model.random_weights=true`) have status "random weights" and stay out of every table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

SCALARS = ["tau", "speedup", "tokens_per_s", "ar_tokens_per_s", "decode_calls", "ar_decode_calls", "call_reduction",
           "new_tokens", "max_tokens_per_forward", "mean_tokens_per_forward", "lossless", "n_prompts", "n_turns",
           "max_new_tokens", "temperature", "task", "loop_overhead", "split", "draft_tree", "decode_speedup",
           "speedup_specbench", "bound", "forward_cost", "n_defects", "n_numeric_ties"]
DICTS = ["per_task_tau", "accept_hist", "ci", "per_task_tau_ci", "acceptance_by_depth", "per_task_acceptance_by_depth"]
IDENTITY = ("group", "model", "method", "bc", "arm")
NOT_OPTIONS = ("name", "_target_", "bc", "seed", "temperature", "model_name", "family")  # set from elsewhere in the job


def _job_keys(config: dict, choices: dict | None = None) -> dict:
    """A job's identity: experiment group, model, method, bc, the sweep arm it ran as, and every method
    option (`m_<key>`; lists and dicts as JSON text)."""
    method = config.get("method", {})
    row = {
        "group": (config.get("wandb") or {}).get("group"),
        "model": config["model"]["name"],
        "method": method.get("name"),
        "bc": config.get("bc"),
        "dtype": config["model"].get("dtype"),
        "arm": (choices or {}).get("arm"),
    }
    for key, v in method.items():
        if key not in NOT_OPTIONS:
            row[f"m_{key}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return row


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per job under `root`: job keys, summary scalars, environment, status and directory."""
    rows = []
    for path in sorted(Path(root).rglob("summary.json")):
        s = json.loads(path.read_text())
        env = s.get("environment", {})
        rows.append(_job_keys(s["config"], s.get("choices")) | {k: s.get(k) for k in SCALARS} | {
            **{k: s.get(k) or ({} if k != "acceptance_by_depth" else []) for k in DICTS},
            "device_name": env.get("device_name"), "torch": env.get("torch"), "transformers": env.get("transformers"),
            "git": env.get("git"), "fingerprint": s.get("fingerprint"), "dir": str(path.parent),
            # a shape model's τ is not a result: kept as a row, never in a table (ok_runs takes status "ok")
            "status": "random weights" if s.get("random_weights") else "ok",
            "mtime": path.stat().st_mtime})
    for path in sorted(Path(root).rglob("error.json")):
        if (path.parent / "summary.json").exists():
            continue
        err = json.loads(path.read_text())
        cfg_file, hydra_file = path.parent / ".hydra" / "config.yaml", path.parent / ".hydra" / "hydra.yaml"
        keys = {}
        if cfg_file.exists():
            from omegaconf import OmegaConf

            choices = OmegaConf.load(hydra_file).hydra.runtime.choices if hydra_file.exists() else {}
            keys = _job_keys(OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=False), dict(choices))
        rows.append(keys | {"status": "failed", "error": err.get("error"), "dir": str(path.parent),
                            "mtime": path.stat().st_mtime})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    ident = [c for c in df.columns if c in IDENTITY or c.startswith("m_")]
    if "fingerprint" in df:  # a run's identity: its fingerprint, or the config keys for summaries without one
        df["identity"] = [fp if isinstance(fp, str) else json.dumps([row.get(c) for c in ident], default=str)
                          for fp, (_, row) in zip(df.fingerprint, df.iterrows())]
        ident = ["group", "identity"]  # the fingerprint leaves W&B (the group) out: the same job in two experiments is two rows
    df = df.sort_values("mtime").drop_duplicates(subset=ident, keep="last", ignore_index=True)
    return df


def job_records(run) -> list[dict]:
    """The turn records of one run (a row of `load_runs`), up to a torn last line."""
    from mtp.runner import read_records

    return read_records(Path(run["dir"]) / "records.jsonl")[0]


def load_records(runs: pd.DataFrame) -> pd.DataFrame:
    """Every turn record of the successful runs, with the run's keys attached."""
    frames = []
    keys = [c for c in runs.columns if c in IDENTITY or c.startswith("m_")]
    for _, run in runs[runs.status == "ok"].iterrows():
        recs = pd.read_json(Path(run["dir"]) / "records.jsonl", lines=True)
        for k in keys:
            recs[k] = run[k]
        frames.append(recs)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
