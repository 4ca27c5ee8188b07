"""`python -m jobs.export source=RUN_OR_CKPT out_dir=exports/x formats=[ours,diffusers,compvis]` (issue 8).

Hydra app around `pipeline.ldm_export.export`; the schema is `pipeline.ldm_export.ExportConfig`.
`weights=raw` consolidates the DeepSpeed checkpoint of any ZeRO stage on the CPU (no GPUs, no launcher);
the default `weights=ema` reads the checkpoint's ema.safetensors. Prints one JSON summary line.
"""
from jobs.config import hydra_main
from pipeline.ldm_export import ExportConfig, export

main = hydra_main("export", ExportConfig, export)

if __name__ == "__main__":
    main()
