"""jobs.launch: torchrun that passes on a preempted run's exit code 75 (torchrun itself exits 1)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from factories import LAUNCHER_VARS, ROOT
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from jobs.checkpointing import PREEMPTED_EXIT_CODE
from jobs.distributed import free_port
from jobs.launch import preempted

# Each worker exits with the code given for its rank, rank 1 a moment later than rank 0.
WORKER = """
import os, sys, time
rank = int(os.environ["RANK"])
time.sleep(rank * 0.5)
sys.exit(int(sys.argv[1 + rank]))
"""

# Each worker waits for USR1 (which torchrun's agent got and forwarded), then exits: 75 after
# reporting it as jobs.train does, or with the code given.
SIGNALLED_WORKER = """
import os, signal, sys, time
from pathlib import Path
from jobs.checkpointing import PREEMPTED_EXIT_CODE, report_preempted
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
(Path(sys.argv[1]) / os.environ["RANK"]).touch()
while not got:
    time.sleep(0.05)
if sys.argv[2] == "75":
    report_preempted(int(os.environ["RANK"]))
sys.exit(int(sys.argv[2]))
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"PYTHONPATH": str(ROOT)}


def failures(*codes: int) -> ChildFailedError:
    return ChildFailedError("worker.py", {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>")
                                          for rank, code in enumerate(codes)})


def test_preempted_means_some_75_and_nothing_else_but_the_agents_stop_signals():
    assert preempted(failures(75, 75))
    assert preempted(failures(75, -15))  # rank 1 stopped by the agent after rank 0 exited 75
    assert preempted(failures(75))
    assert not preempted(failures(75, 1))  # a real failure on another rank wins
    assert not preempted(failures(1, -15))
    assert not preempted(failures(-9))  # killed (OOM), never checkpointed


@pytest.mark.parametrize(("codes", "expected"), [((75, 75), PREEMPTED_EXIT_CODE), ((1, 75), 1), ((0, 0), 0)])
def test_launch_exits_75_when_the_workers_did(tmp_path, codes, expected):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, "-m", "jobs.launch", "--nproc-per-node=2",
                           f"--master-port={free_port()}", str(script), *map(str, codes)],
                          env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == expected, done.stderr[-3000:]
    if expected == 1:
        assert "ChildFailedError" in done.stderr  # torchrun's own report, unchanged


@pytest.mark.parametrize(("code", "expected"), [(75, PREEMPTED_EXIT_CODE), (3, 1)])
def test_launch_exits_75_when_it_got_the_signal_and_the_workers_checkpointed(tmp_path, code, expected):
    """The SLURM path: USR1 reaches torchrun's agent, which forwards it, waits for its workers and
    re-raises it (torchrun alone exits 1 here, its workers' codes lost)."""
    script = tmp_path / "worker.py"
    script.write_text(SIGNALLED_WORKER)
    launcher = subprocess.Popen([sys.executable, "-m", "jobs.launch", "--nproc-per-node=2",
                                 f"--master-port={free_port()}", "--signals-to-handle=SIGTERM,SIGUSR1",
                                 "--shutdown-timeout=60", str(script), str(tmp_path), str(code)],
                                env=_env(), stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher.send_signal(signal.SIGUSR1)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == expected, stderr[-3000:]
