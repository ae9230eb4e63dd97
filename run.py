"""Run one job (or a Hydra multirun of jobs): `python run.py model=smollm2_135m method=esp bc=30`."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from mtp.data import DataError
from mtp.models import ModelLoadError
from mtp.errors import ConfigError
from mtp.runner import format_summary, run_job
from mtp.tracking import log_job


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run_job(cfg, out_dir)
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary, out_dir))
    log_job(cfg, summary, out_dir)


if __name__ == "__main__":
    main()
