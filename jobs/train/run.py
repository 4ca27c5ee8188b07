"""`python -m jobs.train experiment=demo data.path=...`: train a latent diffusion model.

The same command runs as one process, under `torchrun --nproc_per_node=N`, or under srun (see
jobs/distributed.py). The schema is `jobs.train.config.TrainConfig`; the loop is `jobs.train.loop.train`.
Exit code 75 means "preempted, checkpointed: requeue me".
"""
from jobs.config import hydra_main
from jobs.train.config import TrainConfig
from jobs.train.loop import train

main = hydra_main("train", TrainConfig, train)
