import os

import pytest
import torch

# Tests never touch a network: a hub lookup must fail fast, not retry for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
