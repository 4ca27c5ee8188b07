"""A classifier of noisy latents p_phi(y | z_t, t) for classifier guidance in latent space (App. D.4: the
LDM-8-G rows of Tab. 3 / Tab. 10, "classifier scale 10"), and its log-likelihood for Eq. 16.

As in the released `NoisyLatentImageClassifier`, the network is the encoder half of the diffusion UNet
(Dhariwal & Nichol 2021's EncoderUNetModel): time embedding, input blocks and middle block, built by
ldm.diffusion.unet.encoder_half from the LDM's UNet config (`encoder_config`: the latent channels in,
self-attention where the LDM has cross-attention, since a classifier has no context), then a head:
  "attention": ADM's attention pooling. The mean feature joins the flattened final feature map as one
               more token, a learned positional embedding is added to every token, and one multi-head
               attention from the mean token over all of them is projected (1x1) to the logits. The
               positional embedding ties the classifier to one latent size.
  "mean":      GroupNorm, SiLU, global average, a linear layer (ADM's "adaptive" pooling).
"""
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.diffusion.attention import group_norm, heads_and_dim
from ldm.diffusion.guidance import LogLikelihood
from ldm.diffusion.unet import UNetConfig, encoder_half, timestep_embedding

POOLS = ("attention", "mean")


def encoder_config(unet_cfg: UNetConfig, latent_channels: int) -> UNetConfig:
    """The classifier's UNet config from the LDM's: z_t alone in (no concatenated condition), and
    plain self-attention at the LDM's attention levels instead of cross-attention (no context)."""
    return replace(unet_cfg, in_channels=latent_channels, context_dim=None)


class AttentionPool(nn.Module):
    """ADM's AttentionPool2d: [B, C, H, W] -> [B, out_dim] through the mean token's attention over the map."""

    def __init__(self, channels: int, num_positions: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(channels, num_positions + 1) / channels**0.5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, out_dim, 1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        x_BCN = x_BCHW.flatten(2)
        x_BCN = torch.cat([x_BCN.mean(dim=-1, keepdim=True), x_BCN], dim=-1)  # token 0: the mean
        x_BCN = x_BCN + self.positional_embedding.to(x_BCN.dtype)
        q, k, v = rearrange(self.qkv(x_BCN), "b (three h d) n -> three b h n d", three=3, h=self.num_heads)
        pooled_Bh1d = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only token 0's output is read
        return self.proj(rearrange(pooled_Bh1d, "b h n d -> b (h d) n"))[:, :, 0]


class LatentClassifier(nn.Module):
    """p_phi(y | z_t, t): (z_t [B, C, h, w], t [B]) -> logits [B, num_classes] (module doc).

    unet_cfg: the encoder's config, without cross-attention (see `encoder_config`); latent_hw: the
    latent size (h, w) it classifies, which the attention head's positional embedding is made for.
    """

    def __init__(self, unet_cfg: UNetConfig, num_classes: int, latent_hw: tuple[int, int], pool: str = "attention"):
        super().__init__()
        if unet_cfg.context_dim is not None:
            raise ValueError(f"unet_cfg.context_dim={unet_cfg.context_dim}: a classifier of z_t has no context to "
                             "cross-attend to; build its config with encoder_config(unet_cfg, latent_channels)")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: use one of {POOLS}")
        f = unet_cfg.downsample_factor
        if len(latent_hw) != 2 or min(latent_hw) < 1 or latent_hw[0] % f or latent_hw[1] % f:
            raise ValueError(f"latent_hw={tuple(latent_hw)}: two sides, multiples of the encoder's downsampling {f}")
        self.cfg, self.num_classes, self.latent_hw, self.pool = unet_cfg, num_classes, tuple(latent_hw), pool
        self.time_embed, self.input_blocks, self.middle_block, skip_channels = encoder_half(unet_cfg)
        ch = skip_channels[-1]
        if pool == "attention":
            num_heads, _ = heads_and_dim(ch, unet_cfg.num_heads, unet_cfg.num_head_channels)
            num_positions = (latent_hw[0] // f) * (latent_hw[1] // f)
            head = AttentionPool(ch, num_positions, num_heads, num_classes)
        else:
            head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), head)

    def forward(self, z_t_BCHW: Tensor, t_B: Tensor) -> Tensor:
        if tuple(z_t_BCHW.shape[-2:]) != self.latent_hw:
            raise ValueError(f"latents of {tuple(z_t_BCHW.shape[-2:])}: this classifier was built for "
                             f"{self.latent_hw}; train one for this latent size")
        emb = self.time_embed(timestep_embedding(t_B, self.cfg.model_channels).to(z_t_BCHW.dtype))
        h = z_t_BCHW
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb))


def classifier_log_likelihood(classifier: nn.Module, labels_B: Tensor) -> LogLikelihood:
    """log p_phi(y | z_t) [B] of each sample's class labels_B [B] (log-softmax of the logits), the guide of
    Eq. 16 for `gradient_guidance(..., through_model=False)`; z0_hat is not used."""
    def log_likelihood(z_t: Tensor, t_B: Tensor, z0_hat: Tensor | None = None) -> Tensor:
        if len(labels_B) != len(z_t):
            raise ValueError(f"{len(labels_B)} class labels for a batch of {len(z_t)}: one label per sample")
        log_p_BK = classifier(z_t, t_B).float().log_softmax(dim=-1)
        return log_p_BK.gather(1, labels_B.to(log_p_BK.device, torch.long)[:, None])[:, 0]

    return log_likelihood
