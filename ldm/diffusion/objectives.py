"""Parameterisations (what the network predicts) and the LDM training objective (Eq. 1-2).

The network eps_theta(z_t, t) of the LDM paper predicts the added noise eps (Eq. 1-2, following
DDPM Eq. 14). Two alternatives share the same machinery:
  "v"  - velocity v = sqrt(ab) eps - sqrt(1-ab) z_0 (Salimans & Ho 2022, Sec. 4),
  "x0" - the clean latent z_0 itself.
All three are affine in (z_0, eps) given z_t = sqrt(ab) z_0 + sqrt(1-ab) eps, so each converts
exactly to the others; `predict_x0_eps` does that for the samplers.
"""
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule, gather

OBJECTIVES = ("eps", "v", "x0")
LOSS_TYPES = ("l2", "l1")

Model = Callable[[Tensor, Tensor], Tensor]  # model(x_t_BCHW, t_B) -> prediction_BCHW


def check_objective(objective: str):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: set objective to one of {OBJECTIVES}")


def target(objective: str, x0: Tensor, eps: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The regression target of the network for z_t = q_sample(x0, t, eps)."""
    check_objective(objective)
    if objective == "eps":
        return eps  # Eq. 1-2
    if objective == "x0":
        return x0
    # Salimans & Ho 2022, Sec. 4: v = alpha_t eps - sigma_t x with alpha_t^2 = ab
    sqrt_ab = gather(schedule.sqrt_alpha_bar, t, x0)
    return sqrt_ab * eps - gather(schedule.sqrt_one_minus_alpha_bar, t, x0) * x0


def x0_eps_from_output(objective: str, model_out: Tensor, x_t: Tensor, sqrt_ab: Tensor | float,
                       sqrt_1m_ab: Tensor | float) -> tuple[Tensor, Tensor]:
    """Invert a prediction to (x0, eps) given sqrt(ab) and sqrt(1 - ab) (floats or broadcastable tensors)."""
    check_objective(objective)
    if objective == "eps":
        eps = model_out
        return (x_t - sqrt_1m_ab * eps) / sqrt_ab, eps
    if objective == "x0":
        x0 = model_out
        return x0, (x_t - sqrt_ab * x0) / sqrt_1m_ab
    v = model_out  # z_t and v are a rotation of (z_0, eps) by the angle atan(sqrt(1-ab)/sqrt(ab))
    return sqrt_ab * x_t - sqrt_1m_ab * v, sqrt_1m_ab * x_t + sqrt_ab * v


def predict_x0_eps(objective: str, model_out: Tensor, x_t: Tensor, schedule: NoiseSchedule,
                   t: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by the network output at (x_t, t); the inverse of `target`."""
    sqrt_ab = gather(schedule.sqrt_alpha_bar, t, x_t)
    sqrt_1m_ab = gather(schedule.sqrt_one_minus_alpha_bar, t, x_t)
    return x0_eps_from_output(objective, model_out, x_t, sqrt_ab, sqrt_1m_ab)


def min_snr_weight(objective: str, snr_B: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for a loss in `objective` space.

    Min-SNR weights the x0-space MSE by min(SNR, gamma). An eps-space MSE equals SNR times
    the x0-space MSE and a v-space MSE equals (SNR + 1) times it, so the same weighting
    becomes min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    check_objective(objective)
    clipped_B = snr_B.clamp(max=gamma)
    if objective == "eps":
        return clipped_B / snr_B
    if objective == "v":
        return clipped_B / (snr_B + 1)
    return clipped_B


def sample_noise(x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """eps ~ N(0, I), plus `offset_noise` * N(0, 1) shared per (sample, channel).

    Offset noise (Guttenberg 2023) lets the model change the per-channel mean of an image,
    which the usual noise, being almost zero-mean over a large image, hardly ever destroys.
    """
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise == 0.0:
        return eps
    offset_shape = (x0.shape[0], x0.shape[1]) + (1,) * (x0.ndim - 2)  # [B, C, 1, 1]
    offset = torch.randn(offset_shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return eps + offset_noise * offset


def _check_loss_args(objective: str, loss_type: str, min_snr_gamma: float | None, offset_noise: float):
    check_objective(objective)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: set loss_type to one of {LOSS_TYPES}")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma={min_snr_gamma}: set a positive gamma (the paper uses 5) or None")
    if min_snr_gamma is not None and loss_type != "l2":
        raise ValueError("min_snr_gamma weights an MSE (Hang et al. 2023); set loss_type='l2' "
                         "or min_snr_gamma=None")
    if offset_noise < 0:
        raise ValueError(f"offset_noise={offset_noise}: set a non-negative scale (e.g. 0.1) or 0")


def diffusion_loss(model: Model, x0: Tensor, schedule: NoiseSchedule, *, objective: str = "eps",
                   loss_type: str = "l2", min_snr_gamma: float | None = None, offset_noise: float = 0.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """The LDM objective (Eq. 2) per sample [B], in float32.

    Draws t ~ U{0..T-1} and eps, noises x0 to x_t and regresses model(x_t, t) on the target of
    `objective`. Returns the mean over non-batch dims for each sample, so that the caller can
    weight, average, or skip a non-finite batch. `loss_type="l1"` is the L1 variant of Tab. 12-15.
    """
    _check_loss_args(objective, loss_type, min_snr_gamma, offset_noise)
    if x0.ndim < 2:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}: pass a batch [B, C, ...]")
    t_B = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    eps = sample_noise(x0, offset_noise, generator)
    x_t = schedule.q_sample(x0, t_B, eps)
    err = model(x_t, t_B).float() - target(objective, x0, eps, schedule, t_B).float()
    per_elem = err.square() if loss_type == "l2" else err.abs()
    loss_B = per_elem.flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        loss_B = loss_B * min_snr_weight(objective, schedule.snr(t_B), min_snr_gamma)
    return loss_B
