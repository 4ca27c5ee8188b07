"""`python -m jobs.precompute input_dir=data/images output_dir=data/latents autoencoder=PATH_OR_HUB_ID`.

Hydra app around `pipeline.precompute.precompute`; the schema is `pipeline.precompute.PrecomputeConfig`.
Image shards -> latent shards + manifest.json with a frozen autoencoder: our folder, a diffusers
AutoencoderKL folder or hub id, or a CompVis checkpoint (then also `autoencoder_preset=kl-f8`).
`ray.address=auto` joins a running cluster (the SLURM template starts one); a rerun skips finished shards.
"""
import json

import hydra
from omegaconf import DictConfig

from jobs.config import register_schemas, to_dataclass
from pipeline.precompute import PrecomputeConfig, precompute

register_schemas()


def run(cfg: DictConfig) -> dict:
    summary = precompute(to_dataclass(cfg, PrecomputeConfig))
    print(json.dumps(summary))
    return summary


@hydra.main(config_path="../conf", config_name="precompute", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
