"""KL-regularised first-stage autoencoder and the shared builder (Sec. 3.1, App. G).

Both first-stage models (`AutoencoderKL` here, `VQModel` in ldm/autoencoder/quantize.py)
share one interface that the precompute and training stages rely on:

    encode_moments(x_BCHW) -> moments        what precompute stores on disk
    latent_from_moments(moments, generator) -> z
    decode(z) -> x
    forward(x) -> (x_rec, reg)               reg: the regulariser of Eq. 25

The KL model follows the VAE of Kingma & Welling: the encoder predicts a
diagonal Gaussian q(z|x) and a slight KL penalty towards N(0, I) keeps the
latent's scale in check (Sec. 3.1).
"""
import math

import torch
from torch import nn

from ldm.autoencoder.blocks import Decoder, Encoder
from ldm.autoencoder.config import (
    AUTOENCODER_PRESETS,
    AutoencoderConfig,
    check_image_shape,
    latent_shape,
)
from ldm.autoencoder.quantize import VectorQuantizer, VQModel

__all__ = ["AUTOENCODER_PRESETS", "AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian",
           "VQModel", "VectorQuantizer", "build_autoencoder", "latent_shape"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # CompVis clamp: keeps exp(logvar) finite in fp32


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from moments [B, 2C, h, w] = cat(mean, logvar).

    kl() and nll() sum over every non-batch dimension and return one value per sample [B].
    """

    def __init__(self, moments: torch.Tensor):
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments must be [B, 2*C, ...] (mean and logvar), got "
                             f"{list(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw z = mean + std * eps, eps ~ N(0, I) from `generator`."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample [B], in nats."""
        kl = 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar)
        return kl.sum(dim=tuple(range(1, kl.ndim)))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log q(x) per sample [B], in nats."""
        nll = 0.5 * (math.log(2.0 * math.pi) + self.logvar + (x - self.mean).square() / self.var)
        return nll.sum(dim=tuple(range(1, nll.ndim)))


class AutoencoderKL(nn.Module):
    """KL-reg first stage (Sec. 3.1): x [B, 3, H, W] <-> z [B, embed_dim, H/f, W/f]."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.kind != "kl":
            raise ValueError(f"AutoencoderKL needs kind='kl', got {cfg.kind!r}; "
                             "use build_autoencoder(cfg)")
        self.cfg = cfg
        self.encoder = Encoder(cfg, z_out_channels=2 * cfg.z_channels)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Raw quant_conv output [B, 2*embed_dim, h, w]: mean and (unclamped) logvar."""
        check_image_shape(self.cfg, tuple(x_BCHW.shape))
        return self.quant_conv(self.encoder(x_BCHW))

    def latent_from_moments(self, moments: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ q(z|x) [B, embed_dim, h, w]; pass a seeded generator for a reproducible draw."""
        if moments.shape[1] != 2 * self.cfg.embed_dim:
            raise ValueError(f"moments have {moments.shape[1]} channels, this model expects "
                             f"2 * embed_dim = {2 * self.cfg.embed_dim}")
        return DiagonalGaussian(moments).sample(generator)

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_BCHW))

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_rec, reg): reg is the per-sample KL of Eq. 25, averaged over the batch (a scalar)."""
        posterior = DiagonalGaussian(self.encode_moments(x_BCHW))
        x_rec_BCHW = self.decode(posterior.sample())
        return x_rec_BCHW, posterior.kl().mean()


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | VQModel:
    """The first-stage model `cfg.kind` names, freshly initialised."""
    if cfg.kind == "kl":
        return AutoencoderKL(cfg)
    return VQModel(cfg)
