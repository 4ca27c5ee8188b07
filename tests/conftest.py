import os
from pathlib import Path

import pytest
import torch

# Tests never touch a network: a hub lookup must fail fast, not retry for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# The files that start Ray clusters (or run jobs that do) go to one pytest-xdist worker, one after
# another, so two clusters never compete for one machine's fixed ports and 2 cores. Every other
# file goes whole to one worker, as --dist loadfile does, so module fixtures start once.
# (xdist_group markers cannot do this: xdist 3.8 renames node ids through Item._nodeid, which
# pytest 9.2 no longer reads.)
RAY_FILES = {"test_demo", "test_ingest", "test_ingest_two_nodes", "test_precompute", "test_slurm", "test_url_sources"}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RayFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "ray" if Path(scope).stem in RAY_FILES else scope
    return RayFilesTogether(config, log)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_no_process_group_left():
    """Every test starts seeded, and no job function or test may leave a process group behind: the
    next in-process job would join a stale one (issue 19's order dependence)."""
    torch.manual_seed(0)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from jobs.distributed import cleanup

        cleanup(failed=True)  # so that the tests after this one are not affected too
        pytest.fail("this test left a torch.distributed process group behind: end it with jobs.distributed.cleanup()")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spinning workers made such test files 5-50x slower (measured at load average 7)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A new local Ray cluster for the module (2 CPUs, 200 MB object store), shut down after it."""
    from pipeline.ray_cluster import RayConfig, init_ray

    ray = init_ray(RayConfig(num_cpus=2, object_store_mb=200, temp_dir=str(tmp_path_factory.mktemp("ray"))))
    yield ray
    ray.shutdown()


@pytest.fixture
def single_process_env(monkeypatch):
    """Call it before each in-process job run: one rank (DeepSpeed needs RANK & co., else it looks
    for MPI) on a fresh port. One intra-op thread meanwhile: on 2 cores shared with other jobs, 2
    threads stall each other (steps seen to take 0.2-9 s), 1 thread runs at a steady pace."""
    from jobs.distributed import free_port

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def fresh():
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            monkeypatch.setenv(key, value)
    yield fresh
    torch.set_num_threads(threads)


