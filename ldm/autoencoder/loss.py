"""Training objective of the first-stage autoencoders (Sec. 3.1, Eq. 25, App. G).

    L_Autoencoder = min_{E,D} max_psi ( L_rec(x, D(E(x))) - L_adv(D(E(x))) + log D_psi(x)
                                        + L_reg(x; E, D) )                          (Eq. 25)

L_rec is L1 + perceptual_weight * LPIPS; L_reg is a slight KL towards N(0, I)
(KL models) or the codebook + commitment loss (VQ models); L_adv comes from a
patch discriminator D_psi switched on at `disc_start`, weighted adaptively as
in VQGAN (Esser et al. 2021, Eq. 7). The two variants keep the reductions of
the released code, which the paper's weights (kl_weight=1e-6) are tuned for:

- "kl" (CompVis LPIPSWithDiscriminator): Laplace-like NLL with one learned scalar
  log-variance, rec / exp(logvar) + logvar, summed per image and averaged over the
  batch; KL likewise per image (AutoencoderKL.forward's reg).
- "vq" (taming VQLPIPSWithDiscriminator): the mean of rec over all elements.

The training job owns the optimisers: `loss.discriminator.parameters()` go to the
discriminator's, and `loss.logvar` (KL only) may join the autoencoder's. CompVis'
released training script leaves logvar out of every optimiser, so it stays at
`logvar_init`; pass it to the autoencoder optimiser to actually learn it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder.discriminator import NLayerDiscriminator
from ldm.autoencoder.lpips import LPIPS

ADAPTIVE_EPS = 1e-4          # VQGAN Eq. 7: delta in the denominator
ADAPTIVE_MAX = 1e4           # clamp of lambda, as in the released code


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017): 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss: 0.5 (E[-log sigmoid D(x)] + E[-log(1 - sigmoid D(x_rec))])."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor,
                    last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = ||grad_last L_rec|| / (||grad_last L_G|| + 1e-4), clamped to [0, 1e4] (VQGAN Eq. 7).

    Balances the two terms at the decoder's last layer, so the adversarial gradient
    never swamps the reconstruction one. Detached: lambda is a weight, not a loss.
    """
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True, allow_unused=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
    if nll_grad is None or g_grad is None:
        raise ValueError("last_layer is not in the graph of the losses: pass the decoder's last "
                         "weight (model.decoder.conv_out.weight)")
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()


@dataclass(frozen=True)
class FirstStageLossConfig:
    """Loss hyper-parameters; defaults are the KL rows of Tab. 8 (kl-f4 ... kl-f32)."""
    kind: str = "kl"                # "kl" or "vq": must match the autoencoder's kind
    perceptual_weight: float = 1.0  # LPIPS in L_rec; 0 builds no LPIPS dependency
    kl_weight: float = 1e-6         # KL models
    codebook_weight: float = 1.0    # VQ models
    logvar_init: float = 0.0        # KL models' learned scalar log-variance
    disc_start: int = 50001         # first global step with the adversarial terms
    disc_weight: float = 0.5        # multiplies the adaptive weight
    disc_factor: float = 1.0        # multiplies both adversarial terms once started
    disc_loss: str = "hinge"        # or "vanilla"
    disc_num_layers: int = 3        # Tab. 8: 2 for vq-f8 and vq-f16
    disc_in_channels: int = 3
    disc_base_channels: int = 64

    def __post_init__(self):
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"kind={self.kind!r}: set kind to 'kl' or 'vq' (the autoencoder's)")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss={self.disc_loss!r}: choose one of {sorted(DISC_LOSSES)}")
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight",
                     "disc_factor", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")


class FirstStageLoss(nn.Module):
    """Eq. 25 for one autoencoder: holds the discriminator, the frozen LPIPS and (KL) logvar.

    Attribute names (`discriminator`, `perceptual_loss`, `logvar`) are those of the
    released checkpoints' `loss.*` entries.
    """

    def __init__(self, cfg: FirstStageLossConfig, perceptual_loss: LPIPS | None = None):
        super().__init__()
        if cfg.perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError(f"perceptual_weight={cfg.perceptual_weight} needs an LPIPS module: "
                             "pass perceptual_loss=pipeline.models.weights.load_lpips(...), or set "
                             "perceptual_weight=0")
        self.cfg = cfg
        self.perceptual_loss = perceptual_loss
        self.discriminator = NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_base_channels,
                                                 cfg.disc_num_layers)
        if cfg.kind == "kl":
            self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)))

    def disc_factor_at(self, global_step: int) -> float:
        """disc_factor from `disc_start` on, 0 before: the GAN terms are off while the
        autoencoder learns to reconstruct at all."""
        return self.cfg.disc_factor if global_step >= self.cfg.disc_start else 0.0

    def reconstruction(self, x_BCHW: torch.Tensor,
                       x_rec_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rec [B, C, H, W], lpips [B]): |x - x_rec| + perceptual_weight * LPIPS, the image's
        LPIPS broadcast over its pixels as in the released code."""
        rec_BCHW = (x_BCHW - x_rec_BCHW).abs()
        if self.cfg.perceptual_weight == 0:
            return rec_BCHW, x_BCHW.new_zeros(x_BCHW.shape[0])
        p_loss_B = self.perceptual_loss(x_BCHW.contiguous(), x_rec_BCHW.contiguous())
        return rec_BCHW + self.cfg.perceptual_weight * p_loss_B.view(-1, 1, 1, 1), p_loss_B

    def nll(self, rec_BCHW: torch.Tensor) -> torch.Tensor:
        """KL: sum_pixels(rec / exp(logvar) + logvar) / B; VQ: mean(rec) (see module doc)."""
        if self.cfg.kind == "vq":
            return rec_BCHW.mean()
        nll_BCHW = rec_BCHW / torch.exp(self.logvar) + self.logvar
        return nll_BCHW.sum() / rec_BCHW.shape[0]

    def autoencoder_loss(self, x_BCHW: torch.Tensor, x_rec_BCHW: torch.Tensor, reg: torch.Tensor,
                         global_step: int, last_layer: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator side of Eq. 25 -> (loss, logs of detached scalars).

        reg: the autoencoder's second output (KL per image, or codebook + commitment).
        last_layer: model.decoder.conv_out.weight for the adaptive weight; None, or no
        autograd graph (eval, no_grad), gives lambda = 0 as VQGAN does.
        The backward pass also fills the discriminator's .grad: zero them before its step.
        """
        if x_BCHW.shape != x_rec_BCHW.shape:
            raise ValueError(f"x {list(x_BCHW.shape)} and x_rec {list(x_rec_BCHW.shape)} differ")
        rec_BCHW, p_loss_B = self.reconstruction(x_BCHW, x_rec_BCHW)
        nll_loss = self.nll(rec_BCHW)
        reg_weight = self.cfg.kl_weight if self.cfg.kind == "kl" else self.cfg.codebook_weight
        loss = nll_loss + reg_weight * reg
        disc_factor = self.disc_factor_at(global_step)
        g_loss = d_weight = x_BCHW.new_zeros(())
        if disc_factor > 0:  # before disc_start the discriminator is not even run
            g_loss = -self.discriminator(x_rec_BCHW.contiguous()).mean()
            d_weight = self._adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss
        logs = {"loss": loss, "nll_loss": nll_loss, "rec_loss": rec_BCHW.mean(),
                "l1_loss": (x_BCHW - x_rec_BCHW).abs().mean(), "p_loss": p_loss_B.mean(),
                "g_loss": g_loss, "d_weight": d_weight,
                "disc_factor": x_BCHW.new_tensor(disc_factor)}
        return loss, {k: v.detach() for k, v in {**logs, **self._reg_logs(reg)}.items()}

    def _reg_logs(self, reg: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.kind == "kl":
            return {"kl_loss": reg, "logvar": self.logvar}
        return {"codebook_loss": reg}

    def _adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                         last_layer: torch.Tensor | None) -> torch.Tensor:
        """disc_weight * lambda, or 0 where no gradients exist (VQGAN's eval fallback)."""
        if (last_layer is None or not torch.is_grad_enabled()
                or not (nll_loss.requires_grad and g_loss.requires_grad)):
            return nll_loss.new_zeros(())
        return adaptive_weight(nll_loss, g_loss, last_layer) * self.cfg.disc_weight

    def discriminator_loss(self, x_BCHW: torch.Tensor, x_rec_BCHW: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator side of Eq. 25 -> (loss, logs): disc_factor * hinge (or vanilla) loss.

        Inputs are detached here; real and fake go through separate forwards, as in the
        released code, so BatchNorm sees each batch's own statistics. Before disc_start the
        loss is exactly 0 (the job may skip this step then).
        """
        logits_real = self.discriminator(x_BCHW.detach().contiguous())
        logits_fake = self.discriminator(x_rec_BCHW.detach().contiguous())
        disc_factor = self.disc_factor_at(global_step)
        loss = disc_factor * DISC_LOSSES[self.cfg.disc_loss](logits_real, logits_fake)
        logs = {"disc_loss": loss, "logits_real": logits_real.mean(),
                "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach() for k, v in logs.items()}
