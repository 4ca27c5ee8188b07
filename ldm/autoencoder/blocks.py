"""Convolutional encoder and decoder of the first stage (Sec. 3.1, App. G).

The architecture is the VQGAN one (Esser et al. 2021) that the paper reuses for
both regularisations. Sub-module names follow the CompVis `taming` / `ldm` code
(`down.{i}.block.{j}.conv1`, `mid.attn_1.q`, ...) so released first-stage
checkpoints load with `strict=True`; layouts that this requires (1x1-conv
attention projections, `Identity` in place of a missing resample) are noted
where they occur.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.autoencoder.config import NUM_GROUPS, AutoencoderConfig


def group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NUM_GROUPS, num_channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, swish, conv3x3) twice, no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1x1 projection only where the width changes (CompVis `nin_shortcut`).
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.conv1(F.silu(self.norm1(x_BCHW)))
        h_BCHW = self.conv2(self.dropout(F.silu(self.norm2(h_BCHW))))
        return self.nin_shortcut(x_BCHW) + h_BCHW


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with a residual connection.

    q, k, v and the output projection are 1x1 convolutions because the released
    checkpoints store them as [C, C, 1, 1] tensors; the math runs through SDPA.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        height = x_BCHW.shape[2]
        h_BCHW = self.norm(x_BCHW)
        # One head of width C; SDPA's default scale C^-1/2 is the CompVis one.
        q_B1LC, k_B1LC, v_B1LC = (rearrange(proj(h_BCHW), "b c h w -> b 1 (h w) c")
                                  for proj in (self.q, self.k, self.v))
        out_B1LC = F.scaled_dot_product_attention(q_B1LC, k_B1LC, v_B1LC)
        out_BCHW = rearrange(out_B1LC, "b 1 (h w) c -> b c h w", h=height)
        return x_BCHW + self.proj_out(out_BCHW)


class Downsample(nn.Module):
    """Halve h and w: 3x3 conv with stride 2 after padding right/bottom by one (CompVis)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


def _blocks_and_attn(in_channels, out_channels, num_blocks, use_attn, dropout):
    block = nn.ModuleList(ResnetBlock(in_channels if j == 0 else out_channels, out_channels, dropout)
                          for j in range(num_blocks))
    attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks) if use_attn)
    return block, attn


def _run_blocks(block: nn.ModuleList, attn: nn.ModuleList, h_BCHW: torch.Tensor) -> torch.Tensor:
    for j, resnet in enumerate(block):
        h_BCHW = resnet(h_BCHW)
        if len(attn):
            h_BCHW = attn[j](h_BCHW)
    return h_BCHW


class EncoderLevel(nn.Module):
    """One resolution of the encoder: residual blocks (+ attention), then an optional downsample."""

    def __init__(self, in_channels, out_channels, num_blocks, use_attn, downsample, dropout):
        super().__init__()
        self.block, self.attn = _blocks_and_attn(in_channels, out_channels, num_blocks,
                                                 use_attn, dropout)
        # Identity has no parameters, so the last level has no `downsample.*` keys, as in CompVis.
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        return self.downsample(_run_blocks(self.block, self.attn, h_BCHW))


class DecoderLevel(nn.Module):
    """One resolution of the decoder: residual blocks (+ attention), then an optional upsample."""

    def __init__(self, in_channels, out_channels, num_blocks, use_attn, upsample, dropout):
        super().__init__()
        self.block, self.attn = _blocks_and_attn(in_channels, out_channels, num_blocks,
                                                 use_attn, dropout)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        return self.upsample(_run_blocks(self.block, self.attn, h_BCHW))


class MidBlock(nn.Module):
    """ResNet, self-attention, ResNet at the lowest resolution (attention dropped in vq-f4-noattn)."""

    def __init__(self, channels: int, use_attn: bool, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if use_attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h_BCHW)))


class Encoder(nn.Module):
    """x [B, in_channels, H, W] -> [B, z_out_channels, H/f, W/f].

    z_out_channels is 2 * z_channels for the KL model (mean and log-variance) and
    z_channels for the VQ model.
    """

    def __init__(self, cfg: AutoencoderConfig, z_out_channels: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        num_levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        in_channels, res = cfg.base_channels, cfg.resolution
        for i, out_channels in enumerate(widths):
            self.down.append(EncoderLevel(
                in_channels, out_channels, cfg.num_res_blocks, res in cfg.attn_resolutions,
                downsample=i != num_levels - 1, dropout=cfg.dropout))
            in_channels, res = out_channels, res // 2
        self.mid = MidBlock(in_channels, cfg.mid_attention, cfg.dropout)
        self.norm_out = group_norm(in_channels)
        self.conv_out = nn.Conv2d(in_channels, z_out_channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.conv_in(x_BCHW)
        for level in self.down:
            h_BCHW = level(h_BCHW)
        h_BCHW = self.mid(h_BCHW)
        return self.conv_out(F.silu(self.norm_out(h_BCHW)))


class Decoder(nn.Module):
    """z [B, z_channels, h, w] -> x [B, out_channels, h*f, w*f].

    `up` is indexed by level (0 = full resolution, as in CompVis) but runs from the
    last level back to level 0; each level has num_res_blocks + 1 residual blocks.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        in_channels, res = widths[-1], cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, in_channels, 3, padding=1)
        self.mid = MidBlock(in_channels, cfg.mid_attention, cfg.dropout)
        levels = []
        for i in reversed(range(len(widths))):
            levels.insert(0, DecoderLevel(
                in_channels, widths[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                upsample=i != 0, dropout=cfg.dropout))
            in_channels, res = widths[i], res * 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(in_channels)
        self.conv_out = nn.Conv2d(in_channels, cfg.out_channels, 3, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.mid(self.conv_in(z_BCHW))
        for level in reversed(self.up):
            h_BCHW = level(h_BCHW)
        return self.conv_out(F.silu(self.norm_out(h_BCHW)))
