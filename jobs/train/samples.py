"""Sample grids during training: DDIM with classifier-free guidance from the EMA weights.

The EMA is gathered (a collective under ZeRO-3, so every rank calls `sample_grid`) into a plain
copy of the model that only rank 0 builds and runs; the training engine is left untouched.
Latents are decoded with `trainer.sample_autoencoder` when given, else shown directly (first three
channels, per image rescaled to [-1, 1]), which is enough to see training move. A model conditioned
on an image (super-resolution) shows each condition left of its sample.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from jobs.train.config import TrainConfig
from jobs.train.ema import TrainEMA
from jobs.sample.conditions import unet_with_conditions
from jobs.train.setup import Models, TrainModule, autocast, null_input
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.unet import UNet
from ldm.presets import build_conditioner
from pipeline.conditions import colour_map

PREVIEW_UPSCALE = 4  # 16x16 debug latents are too small to look at


@dataclass
class Sampler:
    module: TrainModule            # holds the EMA weights
    decoder: torch.nn.Module | None
    scale_factor: float


def build_sampler(cfg: TrainConfig, models: Models, scale_factor: float, device: torch.device) -> Sampler:
    """Rank 0's sampling copy of the trainable modules, and the first stage's decoder if configured."""
    preset = models.preset
    conditioner = build_conditioner(preset.conditioner) if models.module.conditioner is not None else None
    module = TrainModule(UNet(preset.unet), conditioner).to(device).eval().requires_grad_(False)
    decoder = None
    if cfg.trainer.sample_autoencoder:
        from pipeline.models.autoencoder import load_autoencoder

        decoder = load_autoencoder(cfg.trainer.sample_autoencoder)[0].to(device)
    return Sampler(module, decoder, scale_factor)


@torch.no_grad()
def sample_grid(cfg: TrainConfig, models: Models, ema: TrainEMA, sampler: Sampler | None,
                tokens_BL: Tensor | None, generator: torch.Generator) -> Tensor | None:
    """[N, 3, H, W] in [-1, 1] on rank 0 (None elsewhere). Every rank must call it (EMA gather)."""
    weights = ema.full_state_dict()
    if sampler is None:
        return None
    weights.pop("num_updates")
    sampler.module.load_state_dict(weights, strict=False)
    num, preset = cfg.trainer.num_samples, models.preset
    num = num if tokens_BL is None else min(num, len(tokens_BL))
    device = next(sampler.module.parameters()).device
    x_T = torch.randn(num, preset.unet.out_channels, preset.latent_size, preset.latent_size,
                      generator=generator, device=device)
    model = _guided_model(cfg, models, sampler, tokens_BL, num)
    with autocast(cfg.trainer.precision, device):
        z_0 = sample_ddim(model, x_T, models.schedule, num_steps=cfg.trainer.sample_steps,
                          objective=cfg.model.objective or preset.objective)
    images = _to_images(sampler, z_0.float())
    if cfg.condition_key == "concat":  # condition | sample, pair by pair
        y = tokens_BL[:num].to(images)
        if y.shape[1] == 1:  # semantic: the map's classes in fixed colours
            y = torch.from_numpy(colour_map(y[:, 0].cpu().numpy())).permute(0, 3, 1, 2).to(images) / 127.5 - 1
        shown = F.interpolate(y[:, :3], size=images.shape[-2:], mode="nearest")
        if y.shape[1] == 4:  # inpainting: the masked image | the composite (1 - m) x + m x_hat (Sec. 4.5)
            fill = F.interpolate(y[:, 3:], size=images.shape[-2:], mode="nearest") > 0.5
            shown, images = torch.where(fill, -1.0, shown), torch.where(fill, images, shown)
        images = torch.stack([shown, images], dim=1).flatten(0, 1)
    return images


def _guided_model(cfg: TrainConfig, models: Models, sampler: Sampler, tokens_BL: Tensor | None, num: int):
    unet = sampler.module.unet
    if tokens_BL is None:  # unconditional preset
        return lambda x_t, t_B: unet(x_t, t_B)
    tokens_BL = tokens_BL[:num].to(next(sampler.module.parameters()).device)
    first = models.frozen_conditioner or sampler.module.conditioner
    key = "concat" if cfg.condition_key == "concat" else "context"

    def encode(y):  # as in training: the frozen part (if any), then the part trained in the engine
        c = models.frozen_conditioner(y) if models.frozen_conditioner is not None else y
        return sampler.module.conditioner(c) if sampler.module.conditioner is not None else c
    cond, uncond = {key: encode(tokens_BL)}, {key: encode(null_input(first, tokens_BL))}
    return classifier_free_guidance(unet_with_conditions(unet), cond, uncond, cfg.trainer.guidance_scale)


def _to_images(sampler: Sampler, z_BCHW: Tensor) -> Tensor:
    if sampler.decoder is not None:  # undo the latent scaling (App. G) before decoding
        return sampler.decoder.decode(z_BCHW / sampler.scale_factor).clamp(-1, 1)
    preview = z_BCHW[:, :3]
    low = preview.amin(dim=(1, 2, 3), keepdim=True)
    high = preview.amax(dim=(1, 2, 3), keepdim=True)
    preview = (preview - low) / (high - low).clamp_min(1e-8) * 2 - 1
    return F.interpolate(preview, scale_factor=PREVIEW_UPSCALE, mode="nearest")
