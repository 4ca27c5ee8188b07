"""A real single-node SLURM cluster for the `slurm` tests, started and stopped by the test session.

munged (as user munge), slurmctld and slurmd (as root) run in the foreground as our child processes,
so they are stopped by PID; config, state, spool and logs live in one temporary folder, and
`SLURM_CONF` points the clients (sbatch, srun, submitit) at it, leaving /etc/slurm alone. The
settings that matter were found on these machines (docs/ DESIGN "Environment facts"):
`proctrack/pgid` (linuxproc left background children of finished jobs running), `task/none`,
and `cred_expire=5` + a 1-2 s scheduler so that a requeued job runs again in seconds, not minutes.

Where the machine cannot run SLURM (not root, packages missing) the fixture skips with the reason;
with LDM_REQUIRE_SLURM=1 (set by CI) it fails instead, so CI cannot silently skip it.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
REQUIRE_ENV = "LDM_REQUIRE_SLURM"
START_TIMEOUT_S = 60
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
STEPD_TIMEOUT_S = 30  # > KillWait: slurmstepd ignores SIGTERM and leaves when its job is gone


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the test cluster runs slurmd as root: run the slurm tests as root"
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        return f"SLURM is not installed (missing {', '.join(missing)}): run scripts/install_slurm.sh"
    if not Path("/etc/munge/munge.key").exists():
        return "no /etc/munge/munge.key: reinstall munge (scripts/install_slurm.sh)"
    return None


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: all sockets stay open until every port is chosen."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_line() -> str:
    """This machine's `NodeName=... CPUs=... RealMemory=...`, as slurmd itself detects it."""
    detected = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return detected.splitlines()[0].strip()


def write_config(root: Path) -> Path:
    """slurm.conf for one node and one default partition; every path inside `root`."""
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host, (slurmctld_port, slurmd_port) = socket.gethostname(), _free_ports(2)
    text = f"""\
ClusterName=ldmtest
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={slurmctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MailProg=/bin/true
KillWait=10
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{node_line()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    conf = root / "slurm.conf"
    conf.write_text(text)
    return conf


def _munge_answers() -> bool:
    if not MUNGE_SOCKET.exists():
        return False
    cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                    timeout=10).returncode == 0


def _wait_until(ready, what: str, logs: list[Path], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}:\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            raise TimeoutError(f"{what} not ready after {timeout_s} s\n{tails}")
        time.sleep(0.5)


def _stepd_pids() -> list[int]:
    """slurmstepd processes on this machine (one cluster per machine: they are ours)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "slurmstepd":
                pids.append(int(comm.parent.name))
        except OSError:  # the process left while we looked
            continue
    return pids


@dataclass
class SlurmCluster:
    """The running cluster: `env` is os.environ plus SLURM_CONF, for the client commands."""
    root: Path
    conf: Path
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        # Job scripts run `python`: this interpreter's environment first, as an activated venv would.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, args: list[str], timeout_s: float = 60, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env=self.env, timeout=timeout_s, check=check,
                              cwd=cwd)

    def node_state(self) -> str:
        return self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()

    def job_ids(self) -> list[str]:
        return self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def submit(self, args: list[str], cwd: Path) -> str:
        """`sbatch --parsable ARGS` run in `cwd`: the job id."""
        return self.run(["sbatch", "--parsable", *args], cwd=cwd).stdout.strip().split(";")[0]

    def wait_for_job(self, job_id: str, timeout_s: float) -> int:
        """Waits until the job ended; its exit code (128 + N when a signal N ended it).

        Polls twice a second: `sbatch --wait` backs off to many seconds between polls."""
        deadline = time.monotonic() + timeout_s
        while (fields := self._job_fields(job_id))["JobState"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout_s} s")
            time.sleep(0.5)
        code, signal_number = (int(part) for part in fields["ExitCode"].split(":"))
        return 128 + signal_number if signal_number else code

    def _job_fields(self, job_id: str) -> dict[str, str]:
        shown = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(item.split("=", 1) for item in shown.split() if "=" in item)

    def logs(self) -> list[Path]:
        return [self.root / "slurmctld.log", self.root / "slurmd.log"]

    def _spawn(self, name: str, args: list[str], user: str | None = None) -> None:
        log = open(self.root / f"{name}.out", "ab")  # the daemon owns it until it exits
        self.daemons[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, user=user, group=user,
                                              env=self.env, start_new_session=True)
        log.close()

    def start(self) -> None:
        if not _munge_answers():  # reuse a munged that already serves this machine
            Path("/run/munge").mkdir(mode=0o755, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._spawn("munged", ["munged", "--foreground"], user="munge")
            _wait_until(_munge_answers, "munged", [self.root / "munged.out"])
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        _wait_until(lambda: self.node_state() == "idle", "the SLURM node", self.logs())

    def stop(self) -> None:
        """Cancel every job, wait for their slurmstepd to leave, then stop the daemons by PID."""
        if self.job_ids():
            self.run(["scancel", *self.job_ids()], check=False)
        deadline = time.monotonic() + STEPD_TIMEOUT_S
        while _stepd_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _stepd_pids():  # still there past KillWait: a stuck step, do not leave it behind
            os.kill(pid, signal.SIGKILL)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.daemons:
                _terminate(self.daemons.pop(name))


def _terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def skip_or_fail(reason: str) -> None:
    """Skips the test, or fails it where SLURM tests are required (CI sets LDM_REQUIRE_SLURM=1)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A started single-node cluster; SLURM_CONF is set in os.environ meanwhile (submitit reads it)."""
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)
    root = tmp_path_factory.mktemp("slurm")
    cluster = SlurmCluster(root, write_config(root))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        os.environ.pop("SLURM_CONF") if previous is None else os.environ.update(SLURM_CONF=previous)
