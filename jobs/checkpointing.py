"""Atomic checkpoint folders for DDP and DeepSpeed jobs, RNG state, and preemption.

Layout under a run's checkpoint root:

    step_00001000/            complete: whatever the ranks wrote, plus COMPLETE (json)
    step_00002000/
    latest                    text file naming the newest complete folder (atomic rewrite)
    .tmp-step_00003000/       a save in progress, or one cut off: never loaded, removed later

Saving, identical on every rank (each rank writes its own files, or DeepSpeed writes its
shards):

    with ckpt.saving(step) as tmp_dir:
        if dist_info.is_main:
            torch.save(model_and_optimizer_state, tmp_dir / "state.pt")
        save_rank_state(tmp_dir, dist_info.rank, {"rng": capture_rng_state(), "data": ...})
        # DeepSpeed instead: engine.save_checkpoint(str(tmp_dir), tag="deepspeed")

On exit every rank has finished writing (barrier); rank 0 writes COMPLETE inside the
temporary folder, renames it to `step_XXXXXXXX` (one atomic rename), rewrites `latest`,
and prunes to the newest `keep_last`. A folder without COMPLETE, or still under its
temporary name, is never returned by `latest()`, so a job killed mid-save resumes from
the previous checkpoint. The root must be a file system every rank sees.

Preemption: `PreemptionHandler` turns SIGTERM / SIGUSR1 into a flag; the loop checks it
at step boundaries (`should_stop`, agreed by all ranks), saves, and exits with
PREEMPTED_EXIT_CODE so that the SLURM template requeues the job.
"""
import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.distributed import any_rank, barrier, get_rank

COMPLETE_MARKER = "COMPLETE"
LATEST_POINTER = "latest"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
PREEMPTED_EXIT_CODE = 75  # sysexits EX_TEMPFAIL, "try again later": the sbatch template requeues
PREEMPTED_DIR_ENV = "LDM_PREEMPTED_DIR"  # set by jobs.launch: where ranks report a preempted exit
RESUME_MODES = ("auto", "never")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3       # complete checkpoints kept; older ones are deleted
    resume: str = "auto"     # auto: newest complete one if any | never | PATH (folder or root)

    def __post_init__(self):
        if self.every_steps <= 0:
            raise ValueError(f"checkpoint.every_steps={self.every_steps}: must be a positive step count")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={self.keep_last}: keep at least 1")
        if not self.resume:
            raise ValueError("checkpoint.resume is empty: use auto, never, or a checkpoint path")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder was saved at, from its name."""
    match = STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (step_XXXXXXXX)")
    return int(match.group(1))


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Checkpoint folders under `root`: atomic save (all ranks), newest complete, keep-last-K."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least 1 checkpoint")
        self.root = Path(root)
        self.keep_last = keep_last

    def complete_dirs(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=checkpoint_step)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None.

        Found by scanning rather than by trusting `latest`: a job killed between the rename
        and the pointer update still resumes from its newest complete folder.
        """
        complete = self.complete_dirs()
        return complete[-1] if complete else None

    def resolve_resume(self, resume: str) -> Path | None:
        """resume=never -> None; auto -> latest() (None on a fresh run); else the given path:
        a complete step folder, or a checkpoint root whose newest complete folder is taken."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir() and is_complete(path):
            return path
        newest = CheckpointManager(path).latest() if path.is_dir() else None
        if newest is None:
            raise ValueError(f"resume={resume!r} is neither a complete checkpoint folder (step_* with "
                             f"{COMPLETE_MARKER}) nor a folder holding one: use auto, never, or such a path")
        return newest

    @contextmanager
    def saving(self, step: int) -> Iterator[Path]:
        """Every rank enters with the same step and writes into the yielded folder; see module doc."""
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        if get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a save that was cut off
            tmp.mkdir(parents=True)
        barrier()
        yield tmp  # an exception skips the barriers: the launcher tears the whole job down
        barrier()  # every rank has written its files
        if get_rank() == 0:
            self._finalize(tmp, step)
        barrier()  # nobody reads or re-saves before the folder has its final name

    def _finalize(self, tmp: Path, step: int) -> None:
        marker = {"step": step, "time": time.time(), "files": sorted(p.name for p in tmp.iterdir())}
        _atomic_write_text(tmp / COMPLETE_MARKER, json.dumps(marker))
        final = self.root / step_dir_name(step)
        if final.exists():  # saved again at this step (e.g. after a resume): replace it
            stale = self.root / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _atomic_write_text(self.root / LATEST_POINTER, final.name + "\n")
        self.prune()

    def prune(self) -> None:
        """Delete all but the newest keep_last complete folders, and leftover temporary ones.
        Called by rank 0 at the end of a save, when no other save is in flight."""
        for old in self.complete_dirs()[:-self.keep_last]:
            shutil.rmtree(old)
        for leftover in self.root.glob(f"{TMP_PREFIX}step_*"):
            shutil.rmtree(leftover, ignore_errors=True)


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank_{rank:05d}.pt"


def save_rank_state(folder: Path, rank: int, state: dict) -> None:
    """Per-rank state (RNG, data position): plain containers and tensors only."""
    torch.save(state, rank_file(folder, rank))


def load_rank_state(folder: Path, rank: int) -> dict | None:
    """This rank's state, or None when the checkpoint was written by fewer ranks."""
    path = rank_file(folder, rank)
    return torch.load(path, weights_only=True) if path.is_file() else None


def capture_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, loadable with weights_only=True."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PreemptionHandler:
    """SIGTERM / SIGUSR1 -> a flag; the training loop saves at the next step boundary and exits.

    SLURM sends SIGUSR1 `--signal=B:USR1@N` seconds before the time limit (the batch script
    forwards it) and SIGTERM on preemption. Use as a context manager: the previous handlers
    come back on exit. Must be entered in the main thread (a Python signal rule).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionHandler":
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (a collective: call it on all ranks)."""
        return any_rank(self.received is not None, device)


def report_preempted(rank: int) -> None:
    """Leave word for jobs.launch that this rank checkpointed and exits PREEMPTED_EXIT_CODE: a
    torchrun agent that got the signal itself stops its workers and loses their exit codes."""
    folder = os.environ.get(PREEMPTED_DIR_ENV)
    if folder:
        (Path(folder) / f"rank_{rank:05d}").touch()
