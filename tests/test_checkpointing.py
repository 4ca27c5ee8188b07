"""jobs/checkpointing.py: atomic folders, newest complete, keep-last-K, RNG, preemption, 2 ranks."""
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.checkpointing import (COMPLETE_MARKER, LATEST_POINTER, CheckpointConfig, CheckpointManager,
                                PreemptionHandler, capture_rng_state, checkpoint_step, load_rank_state,
                                restore_rng_state, save_rank_state)

ROOT = Path(__file__).resolve().parents[1]


def _save(ckpt: CheckpointManager, step: int, value: float) -> Path:
    with ckpt.saving(step) as folder:
        torch.save({"w": torch.full((3,), value)}, folder / "state.pt")
    return ckpt.root / f"step_{step:08d}"


def test_save_renames_marks_and_points(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    assert ckpt.latest() is None
    folder = _save(ckpt, 10, 1.0)
    assert folder.is_dir() and (folder / COMPLETE_MARKER).is_file()
    assert (tmp_path / LATEST_POINTER).read_text().strip() == "step_00000010"
    assert ckpt.latest() == folder and checkpoint_step(folder) == 10
    assert not list(tmp_path.glob(".tmp-*"))
    assert torch.load(folder / "state.pt", weights_only=True)["w"].tolist() == [1.0] * 3


def test_cut_off_checkpoints_are_never_picked(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    good = _save(ckpt, 100, 1.0)
    # A save killed mid-write: still under its temporary name.
    (tmp_path / ".tmp-step_00000200").mkdir()
    torch.save({"w": torch.zeros(3)}, tmp_path / ".tmp-step_00000200" / "state.pt")
    # A folder with its final name but no completion marker (e.g. copied by hand, half done).
    (tmp_path / "step_00000300").mkdir()
    (tmp_path / LATEST_POINTER).write_text("step_00000300\n")  # even a wrong pointer is not trusted
    assert ckpt.latest() == good
    assert ckpt.resolve_resume("auto") == good
    # The next save clears the leftover temporary folder.
    _save(ckpt, 400, 2.0)
    assert not (tmp_path / ".tmp-step_00000200").exists()
    assert ckpt.latest().name == "step_00000400"


def test_an_exception_inside_saving_leaves_no_complete_checkpoint(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    _save(ckpt, 1, 1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        with ckpt.saving(2) as folder:
            torch.save({"w": torch.zeros(3)}, folder / "state.pt")
            raise RuntimeError("disk full")
    assert ckpt.latest().name == "step_00000001"


def test_keep_last_k(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(ckpt, step, float(step))
    assert [p.name for p in ckpt.complete_dirs()] == ["step_00000003", "step_00000004"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt = CheckpointManager(tmp_path)
    _save(ckpt, 5, 1.0)
    folder = _save(ckpt, 5, 2.0)
    assert torch.load(folder / "state.pt", weights_only=True)["w"][0] == 2.0
    assert [p.name for p in ckpt.complete_dirs()] == ["step_00000005"]


def test_resume_modes(tmp_path):
    ckpt = CheckpointManager(tmp_path / "ckpt")
    assert ckpt.resolve_resume("auto") is None and ckpt.resolve_resume("never") is None
    first, second = _save(ckpt, 1, 1.0), _save(ckpt, 2, 2.0)
    assert ckpt.resolve_resume("never") is None
    assert ckpt.resolve_resume(str(first)) == first          # a given folder
    assert ckpt.resolve_resume(str(ckpt.root)) == second     # a given root: its newest
    with pytest.raises(ValueError, match="neither a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointConfig(keep_last=0)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_rank_state(tmp_path, 0, {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_rank_state(tmp_path, 0)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert load_rank_state(tmp_path, 1) is None  # written by fewer ranks


def test_preemption_handler_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1
        assert handler.should_stop(torch.device("cpu"))
    assert signal.getsignal(signal.SIGUSR1) == before


TWO_RANK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from jobs.checkpointing import (CheckpointManager, capture_rng_state, load_rank_state,
                                    restore_rng_state, save_rank_state)
    from jobs.distributed import all_gather_object, cleanup, init_distributed

    info = init_distributed(device="cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    ckpt = CheckpointManager(Path(sys.argv[1]), keep_last=2)
    torch.manual_seed(100 + info.rank)
    for step in (1, 2, 3):
        with ckpt.saving(step) as folder:
            if info.is_main:
                torch.save({"step": step}, folder / "state.pt")
            save_rank_state(folder, info.rank, {"rng": capture_rng_state(), "rank": info.rank})
    expected = torch.rand(4)  # what each rank draws after the last save
    latest = ckpt.latest()
    state = load_rank_state(latest, info.rank)
    restore_rng_state(state["rng"])
    assert state["rank"] == info.rank and torch.equal(torch.rand(4), expected)
    names = all_gather_object(latest.name)
    assert names == ["step_00000003"] * 2, names
    # one write per line: the two ranks share the pipe, and print() of several values interleaves
    sys.stdout.write(f"rank {info.rank} ok {sorted(p.name for p in ckpt.complete_dirs())}\\n")
    sys.stdout.flush()
    cleanup()
""")


@pytest.mark.slow
def test_two_ranks_save_and_load_under_torchrun(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(script), str(tmp_path / "ckpt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ['step_00000002', 'step_00000003']") == 2
    ckpt_dirs = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert ckpt_dirs == [LATEST_POINTER, "step_00000002", "step_00000003"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step_00000003").iterdir()) == [
        COMPLETE_MARKER, "rank_00000.pt", "rank_00001.pt", "state.pt"]
