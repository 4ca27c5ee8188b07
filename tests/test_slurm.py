"""The slurm/ templates against a real single-node SLURM cluster that the test session starts
(tests/slurm_cluster.py): job steps, the Ray-over-SLURM data stage (and its fast failure when the
head does not start), USR1 -> requeue, training under torchrun with a preemption round trip that
ends on the uninterrupted run's weights, an ingest job array, and a Hydra multirun through
hydra-submitit-launcher whose points log to one W&B group."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from factories import (
    make_inception_weights,
    overrides_for,
    png_bytes,
    scene,
    write_latents,
)
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

# pytest (prepend import mode) puts tests/ on sys.path; `tests.slurm_cluster` can hit a site-packages `tests`.
from slurm_cluster import skip_or_fail, slurm_cluster  # noqa: F401 (slurm_cluster: the session fixture)

from jobs.checkpointing import CheckpointManager
from jobs.demo.http_server import LoopbackServer
from jobs.demo.scenes import with_base_url, write_demo_dataset

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 150
TRAIN_TIMEOUT_S = 360  # two training jobs side by side on 2 loaded cores, one of them run twice


def _sbatch_wait(cluster, flags: list[str], command: list[str], log: Path) -> tuple[int, str]:
    """sbatch from the repository root and wait: (the job's exit code, its job id)."""
    job_id = cluster.submit([f"--output={log}", *flags, *command], cwd=REPO)
    return cluster.wait_for_job(job_id, JOB_TIMEOUT_S), job_id


def _job_processes(job_id: str) -> list[int]:
    """Processes still running with this job's SLURM_JOB_ID in their environment."""
    needle = f"SLURM_JOB_ID={job_id}\0".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return pids


def _wait_for(predicate, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s} s")
        time.sleep(0.5)


def test_cluster_runs_a_two_task_step(slurm_cluster, tmp_path):
    assert slurm_cluster.node_state() == "idle"
    code, _ = _sbatch_wait(slurm_cluster, ["--ntasks=2"], ["--wrap", "srun hostname"], tmp_path / "out.txt")
    assert code == 0, (tmp_path / "out.txt").read_text()
    assert len((tmp_path / "out.txt").read_text().split()) == 2


@pytest.fixture
def short_tmp() -> Path:
    """A temp folder with a short path: Ray's socket paths below it must stay under 107 characters."""
    folder = Path(tempfile.mkdtemp(prefix="ldm", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _ray_flags(temp_dir: Path, extra_start_args: str = "") -> list[str]:
    """sbatch flags for the Ray template on this 2-CPU node; Ray's files go to `temp_dir`, not /tmp/ray."""
    start_args = f"--object-store-memory=100000000 --temp-dir={temp_dir} {extra_start_args}".strip()
    # --signal: the template's default USR1 300 s before the limit would requeue a 5-minute job at once.
    return ["--nodes=1", "--cpus-per-task=2", "--time=5", "--signal=B:USR1@10",
            f"--export=ALL,LDM_RAY_START_ARGS={start_args}"]


@pytest.fixture
def ray_flags(short_tmp) -> list[str]:
    return _ray_flags(short_tmp)


def test_ray_template_runs_ingest_to_completion(slurm_cluster, ray_flags, tmp_path):
    write_demo_dataset(tmp_path / "www", 12, seed=1)
    out, log = tmp_path / "shards", tmp_path / "job.out"
    with LoopbackServer(tmp_path / "www") as server:
        urls = with_base_url(tmp_path / "www" / "urls.parquet", server.base_url, tmp_path / "urls.parquet")
        stage = ["python", "-m", "jobs.ingest", f"inputs=[{urls}]", f"output_dir={out}", "image_size=32",
                 "part_size=6", "thread_count=4", "ray.address=auto", f"hydra.run.dir={tmp_path}/hydra"]
        code, job_id = _sbatch_wait(slurm_cluster, ray_flags, ["slurm/ray_cluster.sbatch", *stage], log)
    assert code == 0, log.read_text()[-4000:]
    summary = json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])
    assert summary["downloaded"] == 12 and summary["shards"] == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    _wait_for(lambda: not _job_processes(job_id), "the Ray processes of the job did not stop")


def test_ray_template_stops_the_cluster_when_the_stage_fails(slurm_cluster, ray_flags, tmp_path):
    log = tmp_path / "job.out"
    stage = ["python", "-c", "import ray; ray.init(); assert ray.is_initialized(); raise SystemExit(3)"]
    code, job_id = _sbatch_wait(slurm_cluster, ray_flags, ["slurm/ray_cluster.sbatch", *stage], log)
    assert code == 3, log.read_text()[-4000:]
    assert "Ray cluster of 1 nodes" in log.read_text()
    _wait_for(lambda: not _job_processes(job_id), "the Ray processes of the failed job did not stop")


def test_ray_template_fails_fast_when_the_head_does_not_start(slurm_cluster, short_tmp, tmp_path):
    """A `ray start --head` that dies (here: an unknown option) ends the job in seconds with its exit
    code, not at LDM_RAY_WAIT_S (300 s) or the time limit: ray.init alone kept retrying for minutes."""
    log, started = tmp_path / "job.out", time.monotonic()
    flags = _ray_flags(short_tmp, extra_start_args="--no-such-option")
    code, _ = _sbatch_wait(slurm_cluster, flags, ["slurm/ray_cluster.sbatch", "python", "-c", "print('stage ran')"],
                           log)
    text = log.read_text()
    assert code == 1, text[-4000:]
    assert "'ray start --head' on" in text and "exited with code 2" in text, text[-4000:]
    assert "stage ran" not in text
    assert time.monotonic() - started < 90


REQUEUE_JOB = """#!/usr/bin/env bash
set -euo pipefail
source slurm/common.sh
echo "start ${SLURM_RESTART_COUNT:-0}" >> "$RUNS"
requeue_on_signal USR1
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
  run_stage sleep 300  # the first run is preempted here
fi
echo "done ${SLURM_RESTART_COUNT:-0}" >> "$RUNS"
"""


def test_usr1_before_the_time_limit_requeues_the_job(slurm_cluster, tmp_path):
    """`--signal=B:USR1@100` with a 2-minute limit: USR1 reaches the batch shell mid-run (slurmctld
    checks time limits about every 30 s; `scancel --signal=USR1 --batch` is the same delivery at
    preemption); its trap requeues the job, which runs again under the same id and finishes."""
    script, runs, log = tmp_path / "job.sh", tmp_path / "runs.txt", tmp_path / "out"
    script.write_text(REQUEUE_JOB)
    job_id = slurm_cluster.submit(["--time=2", "--signal=B:USR1@100", f"--output={log}", "--open-mode=append",
                                   f"--export=ALL,RUNS={runs}", str(script)], cwd=REPO)
    _wait_for(lambda: runs.exists() and "done" in runs.read_text(), "the requeued job did not finish", 300)
    assert slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT_S) == 0, log.read_text()
    assert runs.read_text().splitlines() == ["start 0", "start 1", "done 1"], log.read_text()
    assert f"got USR1 in job {job_id} (run 0): requeueing" in log.read_text()


FORWARD_JOB = """#!/usr/bin/env bash
set -euo pipefail
source slurm/common.sh
forward_signal USR1
if [[ $SIGNAL == 1 ]]; then  # USR1 to this shell once the step is up, as SLURM sends it
  (while [[ ! -e $READY ]]; do sleep 0.1; done; kill -USR1 $$) &
fi
code=0
run_step python -c "$STEP" || code=$?
exit_or_requeue "$code"
"""
READY = "import os, pathlib; pathlib.Path(os.environ['READY']).touch(); "
STEP_SAVES = ("import signal, sys, time; got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1)); "
              + READY + "[time.sleep(0.1) for _ in range(300) if not got]; sys.exit(75 if got else 1)")
STEP_DIES = READY + "import time; time.sleep(30)"  # no handler: USR1 ends it (128 + 10)
STEP_FAILS = READY + "raise SystemExit(3)"


@pytest.mark.parametrize("signal_sent, step, requeued, code, said", [
    (True, STEP_SAVES, True, 0, "exited with code 75 after USR1"),   # jobs.train's way
    (True, STEP_DIES, True, 0, "exited with code 138 after USR1"),   # a worker without its handler
    (False, STEP_FAILS, False, 3, ""),                                 # no signal: a failure stays a failure
], ids=["saves", "dies", "fails"])
def test_forwarded_signal_decides_the_requeue(tmp_path, signal_sent, step, requeued, code, said):
    """train.sbatch's shell logic without a cluster (scontrol is a stub that records its arguments):
    the step's real exit code is waited for through the interrupted `wait`, then decides."""
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "scontrol"
    stub.write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.txt\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SIGNAL": str(int(signal_sent)), "READY": str(tmp_path / "ready"), "STEP": step}
    done = subprocess.run(["bash", "-c", FORWARD_JOB], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == code, done.stderr
    calls = (tmp_path / "scontrol.txt").read_text() if (tmp_path / "scontrol.txt").exists() else ""
    assert calls == ("requeue 7\n" if requeued else ""), done.stderr
    assert said in done.stderr


TRAIN_STEPS = 12
# One CPU each: the two training jobs run side by side. No GPUs here: 2 CPU ranks per node (gloo).
TRAIN_FLAGS = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", "--signal=B:USR1@30",
               "--export=ALL,LDM_NPROC_PER_NODE=2,LDM_SHUTDOWN_TIMEOUT_S=120"]


@pytest.fixture(scope="module")
def train_jobs(slurm_cluster, tmp_path_factory) -> dict:
    """slurm/train.sbatch twice on the same config (fp32, deterministic): "straight" runs through,
    "preempted" gets USR1 at its batch shell (`scancel --signal=USR1 --batch`, as a site preempts;
    `--signal=B:USR1@N` delivers the same way) once it has logged step 2 of TRAIN_STEPS."""
    root = tmp_path_factory.mktemp("train")
    latents = write_latents(root / "latents")
    jobs = {"root": root}
    for name in ("straight", "preempted"):
        overrides = overrides_for(latents, root / name, TRAIN_STEPS, **{"data.batch_size": 4})
        command = ["slurm/train.sbatch", *overrides, f"hydra.run.dir={root}/hydra_{name}"]
        jobs[name] = slurm_cluster.submit([f"--output={root}/{name}.out", *TRAIN_FLAGS, *command], cwd=REPO)
    metrics = root / "preempted" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
              "the job to be preempted did not log step 2", TRAIN_TIMEOUT_S)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", jobs["preempted"]])
    return jobs


def _final_weights(run_dir: Path) -> tuple[dict, dict]:
    """(DeepSpeed model states, EMA) of the newest checkpoint."""
    folder = CheckpointManager(run_dir / "checkpoints").latest()
    module = torch.load(folder / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return module, load_file(str(folder / "ema.safetensors"))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_template_trains_two_cpu_ranks(slurm_cluster, train_jobs):
    """One torchrun on the node, 2 ranks on gloo, Hydra overrides passed through, exit code 0."""
    root = train_jobs["root"]
    code = slurm_cluster.wait_for_job(train_jobs["straight"], TRAIN_TIMEOUT_S)
    log = (root / "straight.out").read_text()
    assert code == 0, log[-4000:]
    records = _records(root / "straight")
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))
    assert records[-1]["images_seen"] == TRAIN_STEPS * 2 * 4  # 2 ranks x data.batch_size 4
    folder = CheckpointManager(root / "straight" / "checkpoints").latest()
    assert folder.name == f"step_{TRAIN_STEPS:08d}"
    assert {p.name for p in folder.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    assert "requeueing" not in log


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_cluster, train_jobs):
    """USR1 -> batch shell -> srun -> torchrun -> both ranks: jobs.train checkpoints and exits 75, the
    script requeues the job, the rerun resumes (checkpoint.resume=auto) and ends bit-identical to the
    uninterrupted run: the same losses, model states and EMA."""
    root, job_id = train_jobs["root"], train_jobs["preempted"]
    code = slurm_cluster.wait_for_job(job_id, TRAIN_TIMEOUT_S)
    log = (root / "preempted.out").read_text()
    assert code == 0, log[-4000:]
    assert f"got USR1 in job {job_id} (run 0): forwarding it to the training step" in log
    assert f"the training step exited with code 75 after USR1: requeueing job {job_id}" in log  # jobs.launch
    shown = slurm_cluster.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
    assert "Restarts=1" in shown.split()
    resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1, log[-4000:]
    stopped_at = int(resumed[0].split("step_")[1].split()[0])
    assert 2 <= stopped_at < TRAIN_STEPS  # mid-run, from the checkpoint the signal made (none periodic here)
    assert f"checkpointed step {stopped_at}, exiting for requeue" in log
    assert slurm_cluster.wait_for_job(train_jobs["straight"], TRAIN_TIMEOUT_S) == 0
    # metrics.jsonl was cut back to the checkpoint's step on resume: one record per step, same losses.
    losses = {name: [(r["step"], r["loss"]) for r in _records(root / name)] for name in ("straight", "preempted")}
    assert losses["preempted"] == losses["straight"]
    (model_a, ema_a), (model_b, ema_b) = _final_weights(root / "straight"), _final_weights(root / "preempted")
    assert model_a.keys() == model_b.keys() and ema_a.keys() == ema_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert int(ema_b["num_updates"]) == TRAIN_STEPS


def test_ingest_array_runs_one_task_per_input_part(slurm_cluster, short_tmp, tmp_path):
    """--array=0-2 over 2 URL list files: tasks 0 and 1 each ingest their part into part_0000N/ (a
    local Ray each, side by side); task 2 has no part and fails at once, naming the --array to use."""
    write_demo_dataset(tmp_path / "www", 12, seed=1)
    out, parts = tmp_path / "images", tmp_path / "parts"
    parts.mkdir()
    with LoopbackServer(tmp_path / "www") as server:
        table = pq.read_table(with_base_url(tmp_path / "www" / "urls.parquet", server.base_url,
                                            tmp_path / "urls.parquet"))
        for part in range(2):
            pq.write_table(table.slice(6 * part, 6), parts / f"urls-{part}.parquet")
        stage = [f"{parts}/urls-*.parquet", str(out), "image_size=32", "thread_count=4",
                 "ray.object_store_mb=100", f"ray.temp_dir={short_tmp}/${{oc.env:SLURM_ARRAY_TASK_ID}}",
                 f"hydra.run.dir={tmp_path}/hydra_${{oc.env:SLURM_ARRAY_TASK_ID}}"]
        array_id = slurm_cluster.submit(["--array=0-2", "--cpus-per-task=1", "--time=5", "--signal=B:USR1@10",
                                         f"--output={tmp_path}/task_%a.out", "slurm/ingest_array.sbatch", *stage],
                                        cwd=REPO)
        codes = [slurm_cluster.wait_for_job(f"{array_id}_{task}", JOB_TIMEOUT_S) for task in range(3)]
    logs = [(tmp_path / f"task_{task}.out").read_text() for task in range(3)]
    assert codes == [0, 0, 2], "\n".join(log[-3000:] for log in logs)
    for part in range(2):
        summary = json.loads([line for line in logs[part].splitlines() if line.startswith("{")][-1])
        assert summary["downloaded"] == 6 and summary["shards"] == 1, summary
        assert f"urls-{part}.parquet -> {out}/part_0000{part}" in logs[part]
        assert (out / f"part_0000{part}" / "00000.tar").is_file()
    assert "matches 2 files: submit with --array=0-1" in logs[2]


def test_evaluate_template_runs_one_rank_per_task(slurm_cluster, tmp_path, monkeypatch):
    """jobs.evaluate in images= mode (no model) as 2 srun tasks: each rank extracts the features of
    its half, rank 0 gathers all 4 and alone writes metrics.json and prints the summary (two
    unconnected processes would both print one). Inception: make_inception_weights' random network,
    its batch norm calibrated on 2 images (the forward passes at 299 x 299 are what costs here)."""
    from jobs.config import register_schemas, to_dataclass
    from jobs.evaluate.config import FidStatsConfig
    from jobs.evaluate.inception import WEIGHTS_FILENAME
    from jobs.fid_stats import fid_stats

    sets = {"real": [scene(i, 0, grain=0) for i in range(4)], "fake": [scene(i, 1, grain=25) for i in range(4)]}
    for name, images in sets.items():
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            (tmp_path / name / f"{i:04d}.png").write_bytes(png_bytes(image))
    calibration_N3HW = torch.from_numpy(np.stack(sets["real"][:1] + sets["fake"][:1])).permute(0, 3, 1, 2)
    weights = make_inception_weights(tmp_path / WEIGHTS_FILENAME, calibration_N3HW)
    inception = [f"inception.weights_path={weights}", "inception.allow_download=false"]
    register_schemas()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        stats_cfg = compose("fid_stats", overrides=[f"reference={tmp_path / 'real'}", f"out={tmp_path / 'stats'}",
                                                    *inception])
    fid_stats(to_dataclass(stats_cfg, FidStatsConfig))
    log, out = tmp_path / "job.out", tmp_path / "eval"
    overrides = [f"images={tmp_path / 'fake'}", f"reference_stats={tmp_path / 'stats'}", f"out_dir={out}",
                 *inception, "logger=disabled", "metrics.isc_splits=2", "metrics.kid_subsets=2",
                 "metrics.kid_subset_size=2", f"hydra.run.dir={tmp_path}/hydra"]
    flags = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", "--signal=B:USR1@30"]
    with socket.socket() as busy:  # stale rank variables in the submitting shell must not reach the tasks
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stale = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(busy.getsockname()[1])}
        for name, value in stale.items():
            monkeypatch.setenv(name, value)
        code, _ = _sbatch_wait(slurm_cluster, flags, ["slurm/evaluate.sbatch", *overrides], log)
    text = log.read_text()
    assert code == 0, text[-4000:]
    summaries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["num_samples"] == 4, text[-4000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["num_samples"] == 4 and record["metrics"] == {k: v for k, v in summaries[0].items()
                                                                  if k not in ("out_dir", "num_samples")}


def test_hydra_multirun_through_submitit_slurm(slurm_cluster, tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        skip_or_fail("hydra-submitit-launcher is not installed: pip install hydra-submitit-launcher")
    """Each point is an array task of its own; both log offline to W&B as runs of one group."""
    from wandb.proto.wandb_internal_pb2 import RunRecord

    group = f"sweep-{tmp_path.name}"
    sweep = subprocess.run(
        [sys.executable, str(REPO / "tests" / "slurm_sweep_app.py"), "--multirun", "x=2,3", f"out_dir={tmp_path}",
         "logger.mode=offline", f"logger.group={group}",
         "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=5", "hydra.launcher.signal_delay_s=10",
         "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={tmp_path}/multirun"],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=tmp_path,
        env={**slurm_cluster.env, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    points = [json.loads((tmp_path / f"point_{x}.json").read_text()) for x in (2, 3)]
    assert all(p["array_job_id"] for p in points) and points[0]["job_id"] != points[1]["job_id"]
    # The offline run file holds the run record as protobuf: its run_group field, encoded, is in it.
    group_field = RunRecord(run_group=group).SerializeToString()
    run_files = [list((tmp_path / f"point_{x}" / "wandb").glob("offline-run-*/run-*.wandb")) for x in (2, 3)]
    assert [len(files) for files in run_files] == [1, 1]
    assert all(group_field in files[0].read_bytes() for files in run_files)
    assert run_files[0][0].name != run_files[1][0].name  # two runs (ids) in the group
