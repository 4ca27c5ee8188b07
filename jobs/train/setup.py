"""Builders of the LDM training job: models from the preset, optimizer, LR schedule, DeepSpeed engine.

Precision, activation checkpointing and torch.compile are applied here, from outside the plain
`ldm` modules (STYLE.md). bf16 is torch.autocast around the forward with fp32 weights, gradients
and optimizer state (not DeepSpeed's bf16 mode), so that every ZeRO stage sees fp32 tensors and
the EMA can average the live fp32 weights (or their ZeRO-3 shards, jobs/train/ema.py).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from jobs.train.config import OptimConfig, TrainConfig
from ldm.diffusion.conditioners import CONCAT_CONDITIONERS
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.unet import TimestepBlock, UNet
from ldm.presets import PRESETS, TOKEN_KINDS, LDMPreset, build_conditioner

# Dense bf16 matmul peaks (TFLOP/s) of GPUs we know, for MFU when trainer.peak_tflops is unset.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class TrainModule(nn.Module):
    """What DeepSpeed wraps: the UNet and, when trained jointly (Eq. 3), the conditioner tau_theta.

    forward(z_t, t, cond): cond is token ids [B, L] when tau_theta is inside (its parameters then
    sit in the same ZeRO-partitioned optimizer as the UNet's), else a context [B, L, D] computed
    by a frozen encoder outside, or None for unconditional models; for a concat conditioner it is
    the spatial condition [B, C, h, w] (the low-res image), whose tau_theta output joins z_t's
    channels (Sec. 4.4).
    """

    def __init__(self, unet: UNet, conditioner: nn.Module | None):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(self, z_t_BCHW: torch.Tensor, t_B: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.conditioner, CONCAT_CONDITIONERS):
            return self.unet(torch.cat([z_t_BCHW, self.conditioner(cond).to(z_t_BCHW.dtype)], dim=1), t_B)
        context = self.conditioner(cond) if self.conditioner is not None else cond
        return self.unet(z_t_BCHW, t_B, context)


class StoredContext(nn.Module):
    """tau_theta(y) that jobs.precompute already ran (a frozen text encoder, KEY.context.npy): the batch
    holds the context [B, L, D] itself, so this "encoder" is the identity, and its null condition is
    the stored context of the empty caption (null_context.npy) that guidance dropout trains with."""

    def __init__(self, null_context_LD: torch.Tensor):
        super().__init__()
        self.register_buffer("null_context_LD", null_context_LD.float(), persistent=False)

    def forward(self, context_BLD: torch.Tensor) -> torch.Tensor:
        return context_BLD

    def null_condition(self, batch_size: int) -> torch.Tensor:
        return self.null_context_LD.expand(batch_size, -1, -1)


class InpaintingCondition(nn.Module):
    """The frozen half of inpainting's tau (Sec. 4.5): y = [image, mask] [B, 4, H, W] from the loader ->
    [first-stage latent of the masked image, mask on the latent grid] [B, C + 1, h, w], which the
    engine's ConcatConditioner joins to z_t. The first stage is the one that made the latents."""

    def __init__(self, first_stage: nn.Module, latent_channels: int):
        super().__init__()
        self.first_stage = first_stage.requires_grad_(False).eval()
        self.latent_channels = latent_channels

    def forward(self, y_B4HW: torch.Tensor) -> torch.Tensor:
        from jobs.sample.conditions import inpainting_concat

        return inpainting_concat(self.first_stage, self.latent_channels, y_B4HW[:, :3], y_B4HW[:, 3:])

    def null_like(self, y_B4HW: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y_B4HW)


class SemanticOneHot(nn.Module):
    """The fixed half of semantic synthesis' tau (Sec. 4.3.2): class ids [B, 1, H, W] from the loader ->
    one-hot [B, N, H, W] on the device, which the engine's trainable SpatialRescaler maps to 3 channels.
    Its empty condition is id -1 everywhere: a one-hot of no class, all zeros."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, ids_B1HW: torch.Tensor) -> torch.Tensor:
        from jobs.sample.conditions import one_hot_maps

        return one_hot_maps(ids_B1HW[:, 0], self.num_classes)

    def null_like(self, ids_B1HW: torch.Tensor) -> torch.Tensor:
        return torch.full_like(ids_B1HW, -1)


def null_input(encoder: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The empty condition in place of a batch of inputs y: zeros of y's shape for a spatial condition
    (it has no shape-free one), else the conditioner's null_condition."""
    return encoder.null_like(y) if hasattr(encoder, "null_like") else encoder.null_condition(len(y))


@dataclass
class Models:
    module: TrainModule                    # trainable: goes into the DeepSpeed engine
    frozen_conditioner: nn.Module | None   # tau_theta when not trained jointly
    preset: LDMPreset
    schedule: NoiseSchedule


def build_models(cfg: TrainConfig, device: torch.device, null_context_LD: torch.Tensor | None = None,
                 first_stage: nn.Module | None = None) -> Models:
    """The preset's UNet and conditioner (the first stage is only needed to encode inpainting's masked
    images, `first_stage`: we train on latents).

    With data.use_context the preset's text encoder is not built: the latents hold a frozen text
    encoder's output, and `null_context_LD` (that encoder's context of "") is the empty condition.
    """
    preset = PRESETS[cfg.model.preset]
    unet, conditioner = UNet(preset.unet), build_conditioner(preset.conditioner)
    frozen = None
    if cfg.data.condition == "inpainting":
        assert first_stage is not None, "inpainting encodes masked images with the first stage"
        frozen = InpaintingCondition(first_stage, preset.unet.out_channels).to(device)
    elif cfg.data.condition == "semantic":  # the rescaler stays in the engine: it is trained (Sec. 4.3.2)
        frozen = SemanticOneHot(preset.conditioner.rescaler_in_channels)
    elif cfg.data.use_context:
        assert null_context_LD is not None, "the stored context needs its null condition"
        frozen, conditioner = StoredContext(null_context_LD).to(device), None
    elif conditioner is not None and not cfg.model.train_text_encoder:
        frozen, conditioner = conditioner.requires_grad_(False).eval().to(device), None
    if cfg.trainer.activation_checkpointing:
        apply_activation_checkpointing(unet)
    if cfg.trainer.compile:
        unet.compile(backend=cfg.trainer.compile_backend)
    schedule = NoiseSchedule.from_config(preset.schedule)
    return Models(TrainModule(unet, conditioner).to(device), frozen, preset, schedule)


def _checkpointed_forward(block: nn.Module, x: torch.Tensor, emb: torch.Tensor,
                          context: torch.Tensor | None = None) -> torch.Tensor:
    return checkpoint(block.__class__.forward, block, x, emb, context, use_reentrant=False)


def apply_activation_checkpointing(unet: UNet) -> None:
    """Recompute each UNet block's activations in backward instead of storing them."""
    for block in unet.modules():
        if isinstance(block, TimestepBlock):
            block.forward = partial(_checkpointed_forward, block)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def lr_lambda(cfg: OptimConfig, max_steps: int, step: int) -> float:
    """LR multiplier at optimizer step `step`: linear warm-up, then constant / cosine / linear decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_optimizer(cfg: TrainConfig, module: nn.Module):
    """AdamW over every trainable parameter (UNet + jointly trained tau_theta), and its LR schedule.

    A torch optimizer handed to DeepSpeed (no "optimizer" block): nothing JIT-builds (DESIGN.md).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_lambda, cfg.optim, cfg.trainer.max_steps))
    return optimizer, schedule


def deepspeed_config(cfg: TrainConfig, world_size: int, num_params: int) -> dict:
    """ZeRO buckets hold at most the model (DeepSpeed's 5e8-element default re-allocated per bucket
    costs seconds per step on a small CPU model) and at least 1M elements."""
    micro, accum = cfg.data.batch_size, cfg.trainer.grad_accum_steps
    bucket = int(min(5e8, max(1e6, num_params)))
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world_size,
            "gradient_clipping": cfg.trainer.grad_clip,
            "zero_optimization": {"stage": cfg.trainer.zero_stage, "reduce_bucket_size": bucket,
                                  "allgather_bucket_size": bucket},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**12, "wall_clock_breakdown": False}


def build_engine(cfg: TrainConfig, module: TrainModule, world_size: int):
    """DeepSpeed engine with the configured ZeRO stage (the process group must exist already)."""
    import deepspeed

    optimizer, schedule = build_optimizer(cfg, module)
    num_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg, world_size, num_params), dist_init_required=False)
    return engine


def train_flops_per_image(preset_name: str, train_text_encoder: bool = True,
                          context_length: int | None = None) -> int:
    """Forward + backward FLOPs of one training image, counted once on the meta device (no memory).

    The frozen-encoder case still counts its forward; a context stored by precompute (its length
    given as `context_length`) costs no encoder at all, nor does a class embedding (a table lookup).
    Attention FLOPs come from the SDPA rules of torch.utils.flop_counter.
    """
    preset = PRESETS[preset_name]
    runs_encoder = preset.conditioner.kind in TOKEN_KINDS and not context_length
    with torch.device("meta"):
        module = TrainModule(UNet(preset.unet), build_conditioner(preset.conditioner) if runs_encoder else None)
        channels, size = preset.unet.in_channels, preset.latent_size
        z_t, t_B = torch.randn(1, channels, size, size), torch.zeros(1, dtype=torch.long)
        cond = _meta_condition(preset, context_length)
    counter = FlopCounterMode(display=False)
    with counter:
        module(z_t, t_B, cond).float().square().mean().backward()
    total = counter.get_total_flops()
    if module.conditioner is not None and not train_text_encoder:
        total -= _conditioner_backward_flops(module.conditioner, cond)
    return int(total)


def _meta_condition(preset: LDMPreset, context_length: int | None) -> torch.Tensor | None:
    """What TrainModule's forward gets: tokens for the text encoder, else the context the UNet reads."""
    kind, context_dim = preset.conditioner.kind, preset.unet.context_dim
    if kind == "text" and context_length:
        return torch.zeros(1, context_length, context_dim)
    if kind in TOKEN_KINDS:
        return torch.zeros(1, preset.conditioner.text.max_length, dtype=torch.long)
    return torch.zeros(1, 1, context_dim) if kind == "class" else None  # a class is a one-token context


def _conditioner_backward_flops(conditioner: nn.Module, cond: torch.Tensor) -> int:
    """Backward of a frozen encoder is not run; about twice its forward (weight + input grads)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        conditioner(cond)
    return 2 * counter.get_total_flops()


def peak_flops(cfg_peak_tflops: float | None, device: torch.device) -> float | None:
    """Per-device peak FLOP/s for MFU: the configured value, else a known GPU's bf16 peak, else None."""
    if cfg_peak_tflops is not None:
        return cfg_peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None
