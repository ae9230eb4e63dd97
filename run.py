"""Run one job (or a Hydra multirun of jobs): `python run.py model=smollm2_135m method=esp bc=30`."""

import json
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from mtp.cli import check_command_line
from mtp.data import DataError
from mtp.models import ModelLoadError
from mtp.errors import ConfigError
from mtp.runner import format_summary, run_job
from mtp.tracking import log_job


def run_any(cfg, out_dir: Path) -> tuple[dict, str]:
    """The job `cfg.job` names: `decode` (a method against AR) or `alignment` (Figure 2's analysis)."""
    if cfg.job == "alignment":
        from experiments.alignment import format_alignment, run_alignment

        summary = run_alignment(cfg, out_dir)
        return summary, format_alignment(summary, out_dir)
    if cfg.job != "decode":
        raise ConfigError(f"job={cfg.job!r}: expected decode or alignment")
    summary = run_job(cfg, out_dir)
    return summary, format_summary(summary, out_dir)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    try:
        summary, text = run_any(cfg, out_dir)
    except Exception as e:
        known = isinstance(e, (ConfigError, DataError, ModelLoadError))
        print(f"error: {e}" if known else traceback.format_exc(), file=sys.stderr)
        if hc.mode != RunMode.MULTIRUN:
            sys.exit(2 if known else 1)
        # in a sweep: record the failure in the job's directory and go on with the next job
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "error.json").write_text(json.dumps(
            {"error": str(e), "type": type(e).__name__, "traceback": traceback.format_exc()}, indent=2))
        return
    print(text)
    log_job(cfg, summary, out_dir)


if __name__ == "__main__":
    problem = check_command_line(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
