"""Hydra glue shared by every job: schemas into the ConfigStore, config -> validated dataclass,
and `hydra_main`, the `main()` of every `python -m jobs.<name>` module."""
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# "<config name>_schema" -> the dataclass its yaml's defaults list names, as "module:class". Imported
# only when registered: a job registers its own schema alone, since importing every job's config
# would import every job's dependencies (torch-fidelity and torchvision, pandas: about 3 s of each
# process start, times every rank, sbatch task and demo stage).
SCHEMAS = {"ingest_schema": "pipeline.ingest.stage:IngestConfig",
           "precompute_schema": "pipeline.precompute.stage:PrecomputeConfig",
           "train_autoencoder_schema": "jobs.train_autoencoder.config:TrainAutoencoderConfig",
           "train_schema": "jobs.train.config:TrainConfig", "sample_schema": "jobs.sample.config:SampleConfig",
           "train_classifier_schema": "jobs.train_classifier.config:TrainClassifierConfig",
           "fid_stats_schema": "jobs.evaluate.config:FidStatsConfig",
           "evaluate_schema": "jobs.evaluate.config:EvaluateConfig", "export_schema": "jobs.export.formats:ExportConfig"}


def schema_class(name: str) -> type:
    """The dataclass of SCHEMAS[name], imported now."""
    module, cls = SCHEMAS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def register_schemas(*names: str) -> None:
    """Put the named schemas (default: all of SCHEMAS) into Hydra's ConfigStore."""
    for name in names or SCHEMAS:
        ConfigStore.instance().store(name=name, node=schema_class(name))


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
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)  # conf/<config_name>.yaml's

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
