"""The slurm/ templates against a real single-node SLURM cluster that the test session starts
(tests/slurm_cluster.py): job steps, the Ray-over-SLURM data stage, USR1 -> requeue, and a Hydra
multirun through hydra-submitit-launcher."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.demo_scenes import with_base_url, write_demo_dataset
from pipeline.http_server import LoopbackServer
# pytest (prepend import mode) puts tests/ on sys.path; `tests.slurm_cluster` can hit a site-packages `tests`.
from slurm_cluster import skip_or_fail, slurm_cluster  # noqa: F401 (slurm_cluster: the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 150


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
def ray_flags(tmp_path_factory) -> list[str]:
    """sbatch flags for the Ray template on this 2-CPU node; Ray's files go to a short temp folder
    (its socket paths must stay under 107 characters), not /tmp/ray."""
    start_args = f"--object-store-memory=100000000 --temp-dir={tmp_path_factory.mktemp('ray')}"
    # --signal: the template's default USR1 300 s before the limit would requeue a 5-minute job at once.
    return ["--nodes=1", "--cpus-per-task=2", "--time=5", "--signal=B:USR1@10",
            f"--export=ALL,LDM_RAY_START_ARGS={start_args}"]


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
    """`--signal=B:USR1@55` with a 1-minute limit: USR1 reaches the batch shell mid-run (slurmctld
    checks time limits about every 30 s; `scancel --signal=USR1 --batch` is the same delivery at
    preemption); its trap requeues the job, which runs again under the same id and finishes."""
    script, runs, log = tmp_path / "job.sh", tmp_path / "runs.txt", tmp_path / "out"
    script.write_text(REQUEUE_JOB)
    job_id = slurm_cluster.submit(["--time=1", "--signal=B:USR1@55", f"--output={log}", "--open-mode=append",
                                   f"--export=ALL,RUNS={runs}", str(script)], cwd=REPO)
    _wait_for(lambda: runs.exists() and "done" in runs.read_text(), "the requeued job did not finish")
    assert slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT_S) == 0, log.read_text()
    assert runs.read_text().splitlines() == ["start 0", "start 1", "done 1"], log.read_text()
    assert f"got USR1 in job {job_id} (run 0): requeueing" in log.read_text()


def test_hydra_multirun_through_submitit_slurm(slurm_cluster, tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        skip_or_fail("hydra-submitit-launcher is not installed: pip install hydra-submitit-launcher")
    sweep = subprocess.run(
        [sys.executable, str(REPO / "tests" / "slurm_sweep_app.py"), "--multirun", "x=2,3", f"out_dir={tmp_path}",
         "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=5", "hydra.launcher.signal_delay_s=10",
         "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={tmp_path}/multirun"],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=slurm_cluster.env, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    points = [json.loads((tmp_path / f"point_{x}.json").read_text()) for x in (2, 3)]
    assert all(p["array_job_id"] for p in points) and points[0]["job_id"] != points[1]["job_id"]
