"""`python -m jobs.train`: the latent diffusion model under DeepSpeed ZeRO."""
