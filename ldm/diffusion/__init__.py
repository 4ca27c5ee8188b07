"""The diffusion side (Sec. 3.2-3.3): the UNet and its attention, the conditioners tau_theta and their tokenizers, noise schedules, objectives, samplers, guidance, EMA."""
