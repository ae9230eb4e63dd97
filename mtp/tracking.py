"""Weights & Biases logging of one job. Offline by default (no account needed; `wandb sync` later),
`wandb.mode=disabled` skips it; wandb is imported only when used."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mtp.lossless import lossless_label

SCALARS = ("tau", "speedup", "tokens_per_s", "ar_tokens_per_s", "decode_calls", "call_reduction",
           "new_tokens", "max_tokens_per_forward", "mean_tokens_per_forward")


def log_job(cfg, summary: dict, out_dir: Path) -> None:
    """Resolved config, summary scalars as `<task>/<metric>`, the per-task τ table and the job's
    acceptance histogram, in one W&B run per job, grouped by experiment."""
    if cfg.wandb.mode == "disabled":
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb

    name = f"{cfg.model.name}-{cfg.method.name}-bc{cfg.bc}"
    if summary.get("job") == "alignment":
        _log_alignment(cfg, summary, out_dir, name + "-alignment")
        return
    # one run per job: `with` finishes it, so a multirun never reuses the first job's run
    with wandb.init(project=cfg.wandb.project, group=cfg.wandb.group, name=name, mode=cfg.wandb.mode,
                    dir=str(out_dir), config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous") as run:
        task = cfg.task.name
        scalars = {f"{task}/{k}": summary[k] for k in SCALARS if summary.get(k) is not None}
        scalars |= {f"{t}/tau": v for t, v in summary["per_task_tau"].items() if v is not None}
        for key in ("n_defects", "n_numeric_ties"):  # the lossless classes' counts (mtp/lossless.py)
            if summary.get(key) is not None:
                scalars[f"{task}/{key}"] = summary[key]
        table = wandb.Table(columns=["task", "tau"], data=[[t, v] for t, v in summary["per_task_tau"].items()])
        fig, ax = plt.subplots(figsize=(5, 3))
        hist = {int(k): v for k, v in summary["accept_hist"].items()}
        ax.bar(list(hist), list(hist.values()))
        ax.set(xlabel="tokens committed in one step", ylabel="decode steps", title=name)
        run.log(scalars | {f"{task}/per_task_tau": table, f"{task}/accept_hist": wandb.Image(fig)})
        plt.close(fig)
        run.summary.update(scalars | {f"{task}/lossless": lossless_label(summary)})  # exact / numeric_ties (n) / ...


def _log_alignment(cfg, summary: dict, out_dir: Path, name: str) -> None:
    """Figure 2's job: its scalars and the per-layer cosine curves (accepted vs rejected) as a table."""
    import wandb

    with wandb.init(project=cfg.wandb.project, group=cfg.wandb.group, name=name, mode=cfg.wandb.mode,
                    dir=str(out_dir), config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous") as run:
        scalars = {f"alignment/{k}": summary[k] for k in ("top1_rate", "top_k_rate", "delta_star", "n_slots")
                   if summary.get(k) is not None}
        acc, rej = summary.get("cos_accepted") or [], summary.get("cos_rejected") or []
        rows = [[i, acc[i] if i < len(acc) else None, rej[i] if i < len(rej) else None]
                for i in range(max(len(acc), len(rej)))]
        table = wandb.Table(columns=["layer", "cos_accepted", "cos_rejected"], data=rows)
        run.log(scalars | {"alignment/per_layer_cos": table})
        run.summary.update(scalars)
