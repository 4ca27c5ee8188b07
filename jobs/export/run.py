"""`python -m jobs.export source=RUN_OR_CKPT out_dir=exports/x formats=[ours,diffusers,compvis]`.

Hydra app around `jobs.export.formats.export`; the schema is `jobs.export.formats.ExportConfig`.
`weights=raw` consolidates the DeepSpeed checkpoint of any ZeRO stage on the CPU (no GPUs, no launcher);
the default `weights=ema` reads the checkpoint's ema.safetensors. Prints one JSON summary line.
"""
from jobs.config import hydra_main
from jobs.export.formats import ExportConfig, export

main = hydra_main("export", ExportConfig, export)
