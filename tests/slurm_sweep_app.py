"""A tiny Hydra app that test_slurm.py sweeps through hydra-submitit-launcher (`submitit_slurm`).

Each point writes `{out_dir}/point_{x}.json` with the SLURM job it ran in, proving it ran under
SLURM, logs x**2 through the jobs' own metrics object (`jobs.metrics.Metrics`, so `logger.group=`
and `logger.mode=offline` act as they do for jobs.train) into `{out_dir}/point_{x}/`, and returns
x**2 so the launcher's collected results can be checked too.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from jobs.metrics import LoggerConfig, Metrics


@dataclass
class SweepPointConfig:
    x: int = 0
    out_dir: str = MISSING
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode="disabled", progress_bar=False))


ConfigStore.instance().store(name="sweep_point", node=SweepPointConfig)


@hydra.main(config_path=None, config_name="sweep_point", version_base="1.3")
def main(cfg: SweepPointConfig) -> int:
    record = {"x": cfg.x, "job_id": os.environ.get("SLURM_JOB_ID"),
              "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID")}
    metrics = Metrics(OmegaConf.to_object(cfg.logger), Path(cfg.out_dir, f"point_{cfg.x}"), config=record,
                      is_main=True, total_steps=1)
    metrics.log(1, {"y": cfg.x ** 2})
    metrics.close()
    Path(cfg.out_dir, f"point_{cfg.x}.json").write_text(json.dumps(record))
    return cfg.x ** 2


if __name__ == "__main__":
    main()
