"""VQ-regularised first stage (Sec. 3.1, App. G): vector quantiser and VQ model.

The LDM is trained on the encoder's latent *before* quantisation; the
quantisation layer is absorbed into the decoder (end of Sec. 3.1), so
`VQModel.decode` quantises first and `encode_moments` does not.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.autoencoder.blocks import Decoder, Encoder
from ldm.autoencoder.config import AutoencoderConfig, check_image_shape


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient (van den Oord et al.).

    The codebook is `embedding.weight` [num_embeddings, embed_dim] (CompVis key
    `quantize.embedding.weight`).
    """

    def __init__(self, num_embeddings: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        if num_embeddings <= 0 or embed_dim <= 0:
            raise ValueError(f"num_embeddings={num_embeddings} and embed_dim={embed_dim} "
                             "must both be positive")
        if beta < 0:
            raise ValueError(f"beta={beta}: the commitment weight must be >= 0")
        self.num_embeddings = num_embeddings
        self.beta = beta
        self.embedding = nn.Embedding(num_embeddings, embed_dim)
        # Small uniform init as in taming, so early codes sit near the origin.
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    @torch.no_grad()
    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """argmin_k ||z - e_k||^2 for each row [N] (in fp32, so autocast cannot flip ties)."""
        z_NC, e_KC = z_NC.float(), self.embedding.weight.float()
        dist_NK = (z_NC.square().sum(1, keepdim=True) - 2.0 * z_NC @ e_KC.T
                   + e_KC.square().sum(1))
        return dist_NK.argmin(dim=1)

    def lookup(self, indices_BHW: torch.Tensor) -> torch.Tensor:
        """Codebook rows for integer codes [B, h, w] -> z_q [B, embed_dim, h, w]."""
        return rearrange(self.embedding(indices_BHW), "b h w c -> b c h w")

    def forward(self, z_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q [B, C, h, w], loss (scalar), indices [B, h, w]).

        loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (codebook + commitment,
        VQ-VAE Eq. 3, means over elements). CompVis' default `legacy=True` swaps
        where beta goes; we keep the published form.
        """
        batch, _, height, _ = z_BCHW.shape
        z_NC = rearrange(z_BCHW, "b c h w -> (b h w) c")
        indices_N = self.nearest_code(z_NC)
        z_q_NC = self.embedding(indices_N).to(z_NC.dtype)
        codebook_loss = F.mse_loss(z_q_NC, z_NC.detach())
        commitment_loss = F.mse_loss(z_NC, z_q_NC.detach())
        # Straight-through: the value is exactly the codebook row (z - sg[z] == 0 exactly),
        # the gradient w.r.t. z is the identity and the codebook learns only from its loss.
        z_q_NC = z_q_NC.detach() + (z_NC - z_NC.detach())
        z_q_BCHW = rearrange(z_q_NC, "(b h w) c -> b c h w", b=batch, h=height)
        indices_BHW = rearrange(indices_N, "(b h w) -> b h w", b=batch, h=height)
        return z_q_BCHW, codebook_loss + self.beta * commitment_loss, indices_BHW

    def usage(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codebook statistics of a batch of codes (any shape).

        perplexity = exp(entropy of the empirical code distribution): 1 when a
        single code is used, num_embeddings when all are used equally often.
        fraction_used = share of the codebook that occurs at least once.
        """
        counts_K = torch.bincount(indices.flatten(), minlength=self.num_embeddings).float()
        p_K = counts_K / counts_K.sum()
        entropy = -torch.special.xlogy(p_K, p_K).sum()  # xlogy(0, 0) = 0
        return {"perplexity": entropy.exp(), "fraction_used": (counts_K > 0).float().mean()}


class VQModel(nn.Module):
    """VQ-reg first stage (Sec. 3.1): x [B, 3, H, W] <-> z [B, embed_dim, H/f, W/f]."""

    def __init__(self, cfg: AutoencoderConfig, beta: float = 0.25):
        super().__init__()
        if cfg.kind != "vq":
            raise ValueError(f"VQModel needs kind='vq', got {cfg.kind!r}; use build_autoencoder(cfg)")
        self.cfg = cfg
        self.encoder = Encoder(cfg, z_out_channels=cfg.z_channels)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.embed_dim, beta)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_moments(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent [B, embed_dim, h, w] (after quant_conv): what the LDM models."""
        check_image_shape(self.cfg, tuple(x_BCHW.shape))
        return self.quant_conv(self.encoder(x_BCHW))

    def latent_from_moments(self, moments: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """The stored latent itself: the VQ encoder is deterministic, `generator` is unused."""
        if moments.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"latents have {moments.shape[1]} channels, this model expects "
                             f"embed_dim = {self.cfg.embed_dim}")
        return moments

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """Quantise (the layer absorbed into the decoder, Sec. 3.1), then decode."""
        z_q_BCHW, _, _ = self.quantize(z_BCHW)
        return self.decoder(self.post_quant_conv(z_q_BCHW))

    def decode_indices(self, indices_BHW: torch.Tensor) -> torch.Tensor:
        """Decode integer codes [B, h, w] directly."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(indices_BHW)))

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_rec, reg): reg = codebook + beta * commitment loss (a scalar, Eq. 25)."""
        z_q_BCHW, vq_loss, _ = self.quantize(self.encode_moments(x_BCHW))
        return self.decoder(self.post_quant_conv(z_q_BCHW)), vq_loss
