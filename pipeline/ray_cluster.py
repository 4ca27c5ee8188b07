"""Joining or starting the Ray cluster that the data stages run on (one place for its settings)."""
import os
from dataclasses import dataclass


@dataclass
class RayConfig:
    address: str | None = None      # None: start a local cluster; "auto" or "HOST:PORT": join one
    num_cpus: int | None = None     # local cluster only; None: all cores
    object_store_mb: int = 512      # local cluster only
    temp_dir: str | None = None     # local cluster only; None: Ray's default (/tmp/ray)


def init_ray(cfg: RayConfig):
    """Connect once per process; later calls reuse the connection (tests share one cluster)."""
    # No usage reporting and no auth token files under ~/.ray: offline machines, shared homes.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's import checks PyPI otherwise
    import ray

    if ray.is_initialized():
        return ray
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        # address="local": always a new local cluster, never one that `ray start` left on this machine
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=cfg.object_store_mb * 1024 ** 2, _temp_dir=cfg.temp_dir)
    return ray
