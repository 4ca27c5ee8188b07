"""`python -m jobs.ingest inputs=[urls.parquet] output_dir=data/images`: URL lists -> image shards.

Hydra app around `pipeline.ingest.stage.ingest`; the schema is `pipeline.ingest.stage.IngestConfig`.
`ray.address=auto` joins a running cluster (the SLURM template starts one).
"""
from jobs.config import hydra_main
from pipeline.ingest.stage import IngestConfig, ingest

main = hydra_main("ingest", IngestConfig, ingest)

if __name__ == "__main__":
    main()
