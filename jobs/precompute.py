"""`python -m jobs.precompute input_dir=data/images output_dir=data/latents autoencoder=PATH_OR_HUB_ID`.

Hydra app around `pipeline.precompute.stage.precompute`; the schema is `pipeline.precompute.stage.PrecomputeConfig`.
Image shards -> latent shards + manifest.json with a frozen autoencoder: our folder, a diffusers
AutoencoderKL folder or hub id, or a CompVis checkpoint (then also `autoencoder_preset=kl-f8`).
`ray.address=auto` joins a running cluster (the SLURM template starts one); a rerun skips finished shards.
"""
from jobs.config import hydra_main
from pipeline.precompute.stage import PrecomputeConfig, precompute

main = hydra_main("precompute", PrecomputeConfig, precompute)

if __name__ == "__main__":
    main()
