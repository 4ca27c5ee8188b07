"""Hydra glue shared by every job: schemas into the ConfigStore, config -> validated dataclass,
and `hydra_main`, the `main()` of every `python -m jobs.<name>` module."""
import json
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobs.evaluate.config import EvaluateConfig, FidStatsConfig
from jobs.export.formats import ExportConfig
from jobs.sample.config import SampleConfig
from jobs.train.config import TrainConfig
from jobs.train_autoencoder.config import TrainAutoencoderConfig
from pipeline.ingest.stage import IngestConfig
from pipeline.precompute.stage import PrecomputeConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMAS = {"ingest_schema": IngestConfig, "precompute_schema": PrecomputeConfig,
           "train_autoencoder_schema": TrainAutoencoderConfig, "train_schema": TrainConfig,
           "sample_schema": SampleConfig, "fid_stats_schema": FidStatsConfig, "evaluate_schema": EvaluateConfig,
           "export_schema": ExportConfig}


def register_schemas() -> None:
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)


def to_dataclass(cfg: DictConfig, schema: type):
    """The dataclass the job runs on; its __post_init__ checks run here, before any work.

    Missing or ill-typed values surface as ValueError naming the key to set.
    """
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ValueError(f"config error at {getattr(err, 'full_key', '?')!r}: {err.msg}; "
                         f"set it on the command line (key=value)") from err
    if not isinstance(obj, schema):
        raise ValueError(f"config is not a {schema.__name__}; compose it with the {schema.__name__} schema")
    return obj


def hydra_main(config_name: str, schema: type, job: Callable[[Any], Any], *, name: str | None = None,
               prepare: Callable[[DictConfig], None] | None = None) -> Callable[[], None]:
    """A job module's `main()`: compose conf/<config_name>.yaml with the command line's overrides,
    let `prepare` adjust the composed config, validate it into `schema` (bad configs fail here,
    before any work), run `job` on it.

    A dict result is printed as one JSON line (the job's summary); an int result is the exit code.
    `name` (default: config_name) is Hydra's job name: its log file is `<name>.log`.
    """
    register_schemas()

    def main(cfg: DictConfig) -> None:
        if prepare is not None:
            prepare(cfg)
        result = job(to_dataclass(cfg, schema))
        if isinstance(result, dict):
            print(json.dumps(result), flush=True)
        elif isinstance(result, int) and result:
            sys.exit(result)

    # Hydra names the job after the last part of the task function's module (else this module: "config").
    main.__module__ = f"jobs.{name or config_name}"
    return hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(main)
