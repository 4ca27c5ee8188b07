"""The time-conditional UNet epsilon_theta(z_t, t, tau_theta(y)) of the LDM paper.

Sec. 3.3 and App. E.2.1 (Tab. 16): a UNet of 2D ResNet blocks (Ho et al. 2020, with the
improvements of Dhariwal & Nichol 2021: scale-shift time conditioning and ResBlock
up/downsampling, both optional), attention at chosen downsampling factors and in the middle.
Attention is plain self-attention, or the SpatialTransformer when the model is conditioned
through cross-attention (text, class embeddings, layouts). Concat conditioning (SR,
inpainting) widens `in_channels`; the caller concatenates.

Submodule names follow the released CompVis `openaimodel.py` so its checkpoints load as they
are: `time_embed`, `input_blocks`, `middle_block`, `output_blocks`, `out`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.diffusion.attention import (
    AttentionBlock,
    SpatialTransformer,
    group_norm,
    heads_and_dim,
    zero_init,
)


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = ()   # downsampling factors (1, 2, 4, ...) that get attention
    num_heads: int = -1                  # exactly one of num_heads / num_head_channels is set
    num_head_channels: int = -1
    context_dim: int | None = None       # None: self-attention; else SpatialTransformer to a context
    transformer_depth: int = 1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError("set exactly one of unet.num_heads and unet.num_head_channels (the other -1)")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"unet.channel_mult must be positive integers, got {self.channel_mult}")
        if self.model_channels % 32:
            raise ValueError(f"unet.model_channels={self.model_channels} must be a multiple of 32 (GroupNorm)")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError("unet.context_dim must be positive, or None for self-attention only")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as in the CompVis code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """ResNet block with the time embedding added (or as FiLM scale-shift), optional up/down."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = False, resample: str | None = None):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample  # None, "up" or "down" (parameter-free, Dhariwal & Nichol 2021)
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x_BCHW: torch.Tensor, emb_BE: torch.Tensor) -> torch.Tensor:
        # Resample between the activation and the conv, so the conv runs at the new resolution.
        h = _resample(self.in_layers[:-1](x_BCHW), self.resample)
        h = self.in_layers[-1](h)
        x_BCHW = _resample(x_BCHW, self.resample)
        emb = self.emb_layers(emb_BE)[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb)
        return self.skip_connection(x_BCHW) + h


class TimestepBlock(nn.Module):
    """A run of layers at one resolution; routes the time embedding and the context to those that take them.

    Children are named 0, 1, ... like an nn.Sequential, the checkpoint layout of the released models.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.children():
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (AttentionBlock, SpatialTransformer)):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _res_block(cfg: UNetConfig, ch_in: int, emb_dim: int, ch_out: int, resample: str | None = None) -> ResBlock:
    return ResBlock(ch_in, emb_dim, ch_out, cfg.dropout, cfg.use_scale_shift_norm, resample)


def _attention(cfg: UNetConfig, ch: int) -> nn.Module:
    num_heads, head_dim = heads_and_dim(ch, cfg.num_heads, cfg.num_head_channels)
    if cfg.context_dim is None:
        return AttentionBlock(ch, num_heads)
    return SpatialTransformer(ch, num_heads, head_dim, cfg.transformer_depth, cfg.context_dim, cfg.dropout)


def encoder_half(cfg: UNetConfig) -> tuple[nn.Sequential, nn.ModuleList, TimestepBlock, list[int]]:
    """(time_embed, input_blocks, middle_block, skip channels) of the UNet: its encoder half, which the
    UNet continues with its output blocks and a classifier of noisy latents (ADM's EncoderUNetModel,
    App. D.4's LDM-8-G) with a pooling head. The last skip channel count is the middle block's width."""
    ch = cfg.model_channels
    emb_dim = 4 * ch
    time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    input_blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
    skip_channels, ds = [ch], 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [_res_block(cfg, ch, emb_dim, mult * cfg.model_channels)]
            ch = mult * cfg.model_channels
            if ds in cfg.attention_ds:
                layers.append(_attention(cfg, ch))
            input_blocks.append(TimestepBlock(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            down = _res_block(cfg, ch, emb_dim, ch, "down") if cfg.resblock_updown else Downsample(ch)
            input_blocks.append(TimestepBlock(down))
            skip_channels.append(ch)
            ds *= 2
    middle_block = TimestepBlock(
        _res_block(cfg, ch, emb_dim, ch), _attention(cfg, ch), _res_block(cfg, ch, emb_dim, ch))
    return time_embed, input_blocks, middle_block, skip_channels


class UNet(nn.Module):
    """epsilon_theta: (z_t [B, C, H, W], t [B], context [B, L, D] or None) -> [B, out_channels, H, W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed, self.input_blocks, self.middle_block, skip_channels = encoder_half(cfg)
        ch, ds, emb_dim = skip_channels[-1], cfg.downsample_factor, 4 * cfg.model_channels
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [_res_block(cfg, ch + skip_channels.pop(), emb_dim, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_ds:
                    layers.append(_attention(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(_res_block(cfg, ch, emb_dim, ch, "up") if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepBlock(*layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        f = self.cfg.downsample_factor
        if x_BCHW.shape[-2] % f or x_BCHW.shape[-1] % f:
            raise ValueError(f"latent sides {tuple(x_BCHW.shape[-2:])} must be multiples of the UNet's "
                             f"total downsampling {f}; crop or resize the inputs")
        emb = self.time_embed(timestep_embedding(t_B, self.cfg.model_channels).to(x_BCHW.dtype))
        h, skips = x_BCHW, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
