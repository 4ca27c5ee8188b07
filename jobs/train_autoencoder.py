"""`python -m jobs.train_autoencoder experiment=ae_demo run_dir=runs/ae data.path=data/images`

Trains a first-stage autoencoder (KL or VQ, Sec. 3.1, Eq. 25) on the ingest stage's image
shards and exports it where `jobs.precompute` loads it (`run_dir/autoencoder`). The same
command runs under `torchrun --nproc_per_node=N` and under srun (jobs/distributed.py).
Schema: jobs/autoencoder_config.py; loop: jobs/autoencoder_loop.py. On SIGTERM / SIGUSR1
the job saves a checkpoint and exits with PREEMPTED_EXIT_CODE (75) so SLURM requeues it;
the rerun resumes from it (checkpoint.resume=auto).
"""
import json
import sys

import hydra
from omegaconf import DictConfig

from jobs.autoencoder_config import TrainAutoencoderConfig
from jobs.autoencoder_loop import run_training
from jobs.checkpointing import PREEMPTED_EXIT_CODE
from jobs.config import register_schemas, to_dataclass
from jobs.distributed import cleanup, init_distributed, print0

register_schemas()


def train_autoencoder(cfg: TrainAutoencoderConfig) -> dict:
    """The whole job on a validated config: join the process group, train, evaluate, export."""
    dist_info = init_distributed(device=cfg.trainer.device)
    try:
        summary = run_training(cfg, dist_info)
        print0(json.dumps(summary))  # while the process group still says who rank 0 is
        return summary
    finally:
        cleanup()


def run(cfg: DictConfig) -> dict:
    return train_autoencoder(to_dataclass(cfg, TrainAutoencoderConfig))


@hydra.main(config_path="../conf", config_name="train_autoencoder", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if run(cfg)["preempted"]:
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
