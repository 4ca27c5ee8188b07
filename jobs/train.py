"""`python -m jobs.train experiment=demo data.path=...`: train a latent diffusion model (issue 6).

The same command runs as one process, under `torchrun --nproc_per_node=N`, or under srun (see
jobs/distributed.py). The schema is `jobs.train_config.TrainConfig`; the loop is `jobs.train_loop.train`.
Exit code 75 means "preempted, checkpointed: requeue me".
"""
import sys

import hydra
from omegaconf import DictConfig

from jobs.config import register_schemas, to_dataclass
from jobs.distributed import cleanup
from jobs.train_config import TrainConfig
from jobs.train_loop import train

register_schemas()


def run(cfg: DictConfig) -> int:
    try:
        return train(to_dataclass(cfg, TrainConfig))
    finally:
        cleanup()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
