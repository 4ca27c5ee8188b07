"""A tiny Hydra app that test_slurm.py sweeps through hydra-submitit-launcher (`submitit_slurm`).

Each point writes `{out_dir}/point_{x}.json` with the SLURM job it ran in, proving it ran under
SLURM, and returns x**2 so the launcher's collected results can be checked too.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SweepPointConfig:
    x: int = 0
    out_dir: str = MISSING


ConfigStore.instance().store(name="sweep_point", node=SweepPointConfig)


@hydra.main(config_path=None, config_name="sweep_point", version_base="1.3")
def main(cfg: SweepPointConfig) -> int:
    record = {"x": cfg.x, "job_id": os.environ.get("SLURM_JOB_ID"), "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID")}
    Path(cfg.out_dir, f"point_{cfg.x}.json").write_text(json.dumps(record))
    return cfg.x ** 2


if __name__ == "__main__":
    main()
