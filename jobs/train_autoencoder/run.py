"""`python -m jobs.train_autoencoder experiment=ae_demo run_dir=runs/ae data.path=data/images`

Trains a first-stage autoencoder (KL or VQ, Sec. 3.1, Eq. 25) on the ingest stage's image
shards and exports it where `jobs.precompute` loads it (`run_dir/autoencoder`). The same
command runs under `torchrun --nproc_per_node=N` and under srun (jobs/distributed.py).
Schema: jobs/train_autoencoder/config.py; loop: jobs/train_autoencoder/loop.py. On SIGTERM / SIGUSR1
the job saves a checkpoint and exits with PREEMPTED_EXIT_CODE (75) so SLURM requeues it;
the rerun resumes from it (checkpoint.resume=auto).
"""
import json

from jobs.checkpointing import PREEMPTED_EXIT_CODE
from jobs.config import hydra_main
from jobs.distributed import cleanup, init_distributed, print0
from jobs.train_autoencoder.config import TrainAutoencoderConfig
from jobs.train_autoencoder.loop import run_training


def train_autoencoder(cfg: TrainAutoencoderConfig) -> dict:
    """The whole job on a validated config: join the process group, train, evaluate, export."""
    dist_info = init_distributed(device=cfg.trainer.device)
    try:
        summary = run_training(cfg, dist_info)
        print0(json.dumps(summary))  # while the process group still says who rank 0 is
        return summary
    finally:
        cleanup()


def _exit_code(cfg: TrainAutoencoderConfig) -> int:
    return PREEMPTED_EXIT_CODE if train_autoencoder(cfg)["preempted"] else 0


main = hydra_main("train_autoencoder", TrainAutoencoderConfig, _exit_code)
