"""`python -m jobs.launch [torchrun arguments] -m jobs.train ...`: torchrun, passing on exit code 75.

torchrun's agent exits 1 when a worker fails, whatever the worker's code, and when the agent itself
gets the signal (`--signals-to-handle`) it stops its workers and re-raises it, their codes lost. So
a preempted `jobs.train` (every rank checkpointed and exited PREEMPTED_EXIT_CODE) looked like a
crash to the script that runs it. This is torchrun unchanged (same arguments, same error report)
except that it exits PREEMPTED_EXIT_CODE when its workers stopped for preemption. slurm/common.sh's
torchrun_step runs it; run it in place of `torchrun` yourself for the same behaviour.
"""
import os
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from jobs.checkpointing import PREEMPTED_DIR_ENV, PREEMPTED_EXIT_CODE


def preempted(error: ChildFailedError) -> bool:
    """Some worker exited PREEMPTED_EXIT_CODE and none exited with another code. After the first
    worker exits the agent stops the rest (SIGTERM, then SIGKILL) and lists them as failures with a
    negative code: those count as stopped, not failed. A rank exits 75 only after the checkpoint's
    closing barrier, which every rank reached alive, so the checkpoint is complete whatever the
    agent then did to the others."""
    codes = {failure.exitcode for failure in error.failures.values()}
    return PREEMPTED_EXIT_CODE in codes and all(code == PREEMPTED_EXIT_CODE or code < 0 for code in codes)


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="ldm-launch-") as reports:
        os.environ[PREEMPTED_DIR_ENV] = reports  # the workers inherit it (checkpointing.report_preempted)
        try:
            torchrun_main(argv)
        except ChildFailedError as error:
            if not preempted(error):
                raise
        except SignalException as error:  # the agent got it, forwarded it and waited for the workers
            if not any(Path(reports).iterdir()):
                raise
            print(f"ldm: torchrun got signal {error.sigval.name}; its workers checkpointed", file=sys.stderr)
        else:
            return 0
    print(f"ldm: the workers exited {PREEMPTED_EXIT_CODE} (preempted, checkpointed): exiting "
          f"{PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
