"""jobs/distributed.py (launcher discovery, single-process fallback) and jobs/metrics.py."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import jobs.distributed as distributed
from jobs.distributed import DistInfo, first_slurm_host, init_distributed, launcher_env
from jobs.metrics import LoggerConfig, Metrics, image_grid


@pytest.mark.parametrize("nodelist, host", [("gpu017", "gpu017"), ("gpu[003-007,011]", "gpu003"),
                                            ("node[12,15],cpu1", "node12"), ("a-b.c[9]", "a-b.c9")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert launcher_env(env) == {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                     "MASTER_PORT")}


def test_srun_tasks_map_to_torchrun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[010-011]"}
    assert launcher_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu010",
                                 "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert launcher_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "7"}) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}


def test_plain_process_and_single_task_sbatch_need_no_process_group():
    assert launcher_env({}) == {}
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}


def test_single_process_fallback(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(device="cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), None) and info.is_main
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(3) == 3 and not distributed.any_rank(False, info.device)
    grad = torch.ones(2)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = grad.clone()
    distributed.average_gradients([p])
    assert torch.equal(p.grad, grad)
    with pytest.raises(ValueError, match="device"):
        init_distributed(device="tpu")


def test_single_process_can_get_a_one_rank_group(monkeypatch):
    """What DeepSpeed needs even alone: a process group, without any launcher variables."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(always_init_process_group=True, device="cpu")
    try:
        assert (info.backend, info.world_size) == ("gloo", 1)
        assert distributed.all_gather_object("x") == ["x"]
    finally:
        distributed.cleanup()
    assert not {"RANK", "MASTER_PORT"} & set(os.environ)  # the invented rendezvous went with the group


def test_cleanup_lets_a_later_deepspeed_engine_start_in_the_same_process(monkeypatch):
    """In-process jobs (tests, notebooks) run one after another: ending the group must also drop the
    groups DeepSpeed cached, or the next engine broadcasts over a destroyed one."""
    import deepspeed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 1}}
    for _ in range(2):
        init_distributed(always_init_process_group=True, device="cpu")
        try:
            model = torch.nn.Linear(2, 2)  # a torch optimizer: DeepSpeed's own would JIT-build C++ (~40 s)
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                              config=config)
            engine.backward(engine(torch.ones(1, 2)).sum())
            engine.step()
        finally:
            distributed.cleanup()


TEARDOWN_SCRIPT = """
import os, sys, time
from pathlib import Path
import torch.distributed as dist
from jobs.distributed import all_gather_object, cleanup, init_distributed

out, mode = Path(sys.argv[1]), sys.argv[2]
info = init_distributed(device="cpu")
all_gather_object(info.rank)
if mode == "ok":
    if info.rank == 1:
        time.sleep(2)  # rank 1 reaches the end late
        (out / "rank1_arrived").touch()
    cleanup()
    if info.rank == 0:  # the barrier held rank 0 until rank 1 had arrived
        (out / "rank0_saw").write_text(str((out / "rank1_arrived").exists()))
else:  # rank 1 fails without reaching cleanup; rank 0's cleanup after its own error must not wait for it
    if info.rank == 1:  # it stays until rank 0 is done (else torchrun may stop rank 0 first), then dies
        deadline = time.monotonic() + 60
        while not (out / "rank0_saw").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(3)
    try:
        raise RuntimeError("rank 0 failed too")
    except RuntimeError:
        pass
    finally:
        cleanup(failed=True)
        (out / "rank0_saw").write_text(str(not dist.is_initialized()))
"""


@pytest.mark.parametrize("mode", ["ok", "failed"])
def test_cleanup_waits_for_every_rank_only_on_the_success_path(tmp_path, mode):
    """The gloo teardown race lives in cleanup(): on success no rank ends the group before every rank
    has arrived; after a failure cleanup ends the group without waiting for ranks that never come."""
    import subprocess
    import sys

    from factories import LAUNCHER_VARS, ROOT

    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={distributed.free_port()}", str(script), str(tmp_path), mode],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == (0 if mode == "ok" else 1), done.stderr[-3000:]
    assert (tmp_path / "rank0_saw").read_text() == "True", done.stderr[-3000:]


def test_metrics_jsonl_images_and_resume_truncation(tmp_path):
    cfg = LoggerConfig(mode="disabled", progress_bar=True)
    metrics = Metrics(cfg, tmp_path, config={"a": 1}, is_main=True, total_steps=10)
    for step in (1, 2, 3):
        metrics.log(step, {"loss": torch.tensor(step / 8), "lr": 1e-4})
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 5).view(2, 3, 4, 5)
    path = metrics.log_images(3, "train/reconstructions", images, num_columns=2)
    metrics.advance(3, {"loss": 0.3})
    metrics.close()
    assert np.asarray(Image.open(path)).shape == (4, 2 * 5 + 2, 3)
    resumed = Metrics(cfg, tmp_path, config={}, is_main=True, total_steps=10, start_step=2)
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.125), (2, 0.25), (3, 0.5)]


def test_metrics_is_silent_off_rank_0(tmp_path):
    metrics = Metrics(LoggerConfig(), tmp_path / "run", config={}, is_main=False, total_steps=1)
    metrics.log(1, {"loss": 1.0})
    assert metrics.log_images(1, "x", torch.zeros(1, 3, 2, 2), 1) is None
    metrics.close()
    assert not (tmp_path / "run").exists()


def test_image_grid_layout():
    images = torch.zeros(3, 3, 2, 2, dtype=torch.uint8)
    images[1] = 255
    grid = image_grid(images, num_columns=2)
    assert grid.shape == (2 * 2 + 2, 2 * 2 + 2, 3)
    assert (grid[:2, 4:] == 255).all() and (grid[:2, :2] == 0).all() and (grid[4:, :2] == 0).all()


@pytest.mark.slow
def test_wandb_offline_run_is_written_under_the_run_dir(tmp_path):
    metrics = Metrics(LoggerConfig(mode="offline", progress_bar=False), tmp_path, config={"lr": 1e-4},
                      is_main=True, total_steps=2)
    metrics.log(1, {"loss": 1.0})
    metrics.log_images(1, "grid", torch.zeros(2, 3, 4, 4), 2)
    metrics.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert any(run_id in p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
