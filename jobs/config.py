"""Hydra glue shared by every job: schemas into the ConfigStore, config -> validated dataclass."""
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobs.autoencoder_config import TrainAutoencoderConfig
from jobs.train_config import TrainConfig
from pipeline.ingest import IngestConfig
from pipeline.precompute import PrecomputeConfig

SCHEMAS = {"ingest_schema": IngestConfig, "precompute_schema": PrecomputeConfig,
           "train_autoencoder_schema": TrainAutoencoderConfig, "train_schema": TrainConfig}


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
