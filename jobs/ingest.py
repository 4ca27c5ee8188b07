"""`python -m jobs.ingest inputs=[urls.parquet] output_dir=data/images`: URL lists -> image shards.

Hydra app around `pipeline.ingest.ingest`; the schema is `pipeline.ingest.IngestConfig`.
`ray.address=auto` joins a running cluster (the SLURM template starts one).
"""
import json

import hydra
from omegaconf import DictConfig

from jobs.config import register_schemas, to_dataclass
from pipeline.ingest import IngestConfig, ingest

register_schemas()


def run(cfg: DictConfig) -> dict:
    summary = ingest(to_dataclass(cfg, IngestConfig))
    print(json.dumps(summary))
    return summary


@hydra.main(config_path="../conf", config_name="ingest", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
