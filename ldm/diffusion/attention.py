"""Attention blocks of the LDM UNet (Sec. 3.3, App. E.2.1).

Two kinds, both residual and both through `scaled_dot_product_attention`:
- `AttentionBlock`: plain self-attention over the feature map (unconditional and
  concat-conditioned models);
- `SpatialTransformer`: the paper's cross-attention layer: GroupNorm, 1x1 conv in,
  T x [self-attention, cross-attention to tau_theta(y), gated MLP], 1x1 conv out.
  Eq. 3: Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y).

Submodule names follow the released CompVis code so its checkpoints load as they are.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(num_channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups, the normalisation used throughout the UNet."""
    return nn.GroupNorm(32, num_channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a residual branch's last layer so every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def heads_and_dim(channels: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """Heads given either as a count or as channels per head (exactly one is set, the other -1)."""
    if num_head_channels > 0:
        if channels % num_head_channels:
            raise ValueError(f"num_head_channels={num_head_channels} does not divide {channels} channels")
        return channels // num_head_channels, num_head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"num_heads={num_heads} must be positive and divide {channels} channels")
    return num_heads, channels // num_heads


class AttentionBlock(nn.Module):
    """Self-attention over all positions of a feature map, residual."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x_BCHW: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        qkv = self.qkv(self.norm(x_BCHW).reshape(B, C, H * W))
        # The released checkpoints order qkv channels as [head][q, k, v][channel].
        q, k, v = rearrange(qkv, "b (h three d) n -> three b h n d", h=self.num_heads, three=3)
        h_BhNd = F.scaled_dot_product_attention(q, k, v)
        h_BCN = self.proj_out(rearrange(h_BhNd, "b h n d -> b (h d) n"))
        return x_BCHW + h_BCN.reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Multi-head attention of a sequence to a context (itself when context is None). Eq. 3."""

    def __init__(self, query_dim: int, num_heads: int, head_dim: int, context_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = num_heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x_BND: torch.Tensor, context_BLD: torch.Tensor | None = None) -> torch.Tensor:
        context_BLD = x_BND if context_BLD is None else context_BLD
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)  # noqa: E731
        q, k, v = split(self.to_q(x_BND)), split(self.to_k(context_BLD)), split(self.to_v(context_BLD))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): x * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the context, gated MLP; all residual."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, num_heads, head_dim, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, num_heads, head_dim, context_dim=context_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x_BND: torch.Tensor, context_BLD: torch.Tensor | None) -> torch.Tensor:
        x_BND = x_BND + self.attn1(self.norm1(x_BND))
        x_BND = x_BND + self.attn2(self.norm2(x_BND), context_BLD)
        return x_BND + self.ff(self.norm3(x_BND))


class SpatialTransformer(nn.Module):
    """The cross-attention layer that conditions the UNet on tau_theta(y) (Sec. 3.3, Fig. 3)."""

    def __init__(self, channels: int, num_heads: int, head_dim: int, depth: int, context_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, num_heads, head_dim, context_dim, dropout) for _ in range(depth))
        self.proj_out = zero_init(nn.Conv2d(inner_dim, channels, 1))

    def forward(self, x_BCHW: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("SpatialTransformer needs a context (the conditioner's output); "
                             "pass context=..., or build the UNet with context_dim=None for self-attention")
        H, W = x_BCHW.shape[-2:]
        h = rearrange(self.proj_in(self.norm(x_BCHW)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)
        return x_BCHW + self.proj_out(h)
