"""Noise schedules of the forward process q(z_t | z_0) (Sec. 3.2, App. B).

The forward process of DDPM (Ho et al. 2020, Eq. 2 and 4) adds Gaussian noise with
variances beta_1..beta_T, so that q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I)
with alpha_bar_t = prod_{s <= t} (1 - beta_s). Time indices here are 0-based: t in [0, T).

The tables are kept in float64 on the CPU (1 - alpha_bar near t = 0 is ~1e-3 and loses
digits in low precision) and are cast to the tensor's dtype and device only at use.
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULE_KINDS = ("linear", "cosine")
COSINE_OFFSET_S = 0.008  # iDDPM Eq. 17: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # iDDPM: clip betas to avoid a singularity at t = T


@dataclass(frozen=True)
class ScheduleConfig:
    """Which schedule to build; the defaults are the text-to-image LDM's (Tab. 15)."""

    kind: str = "linear"  # "linear" (LDM: linear in sqrt(beta)) or "cosine" (iDDPM)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind={self.kind!r}: set kind to one of {SCHEDULE_KINDS}")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps={self.num_timesteps!r}: set it to a positive integer")
        if not 0.0 < self.beta_start < 1.0:
            raise ValueError(f"beta_start={self.beta_start}: set it inside (0, 1)")
        if not 0.0 < self.beta_end < 1.0:
            raise ValueError(f"beta_end={self.beta_end}: set it inside (0, 1)")
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end={self.beta_end} < beta_start={self.beta_start}: "
                             "set beta_end >= beta_start (noise must grow with t)")


def linear_sqrt_betas(beta_start: float, beta_end: float, num_timesteps: int) -> Tensor:
    """The LDM schedule: sqrt(beta) linear in t (CompVis "linear", diffusers "scaled_linear")."""
    sqrt_betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps,
                                dtype=torch.float64)
    return sqrt_betas**2


def cosine_betas(num_timesteps: int, s: float = COSINE_OFFSET_S) -> Tensor:
    """iDDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17): alpha_bar(u) = f(u) / f(0)."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]  # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    return betas.clamp(max=MAX_BETA)


def gather(values_T: Tensor, t_B: Tensor, like: Tensor) -> Tensor:
    """values_T[t_B] shaped [B, 1, ..., 1] to broadcast against `like`, in its dtype and device."""
    picked_B = values_T[t_B.detach().to("cpu", torch.long)].to(like.dtype)
    return picked_B.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """A discrete variance schedule beta_0..beta_{T-1} and the quantities derived from it.

    A plain object rather than an nn.Module: it has no parameters, and keeping its tables out
    of module buffers keeps them in float64 whatever precision the network is cast to.
    """

    def __init__(self, betas: Tensor):
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas has shape {tuple(betas.shape)}: pass a 1-D tensor of length T")
        betas = betas.detach().to("cpu", torch.float64)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1): fix the schedule that produced them")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.num_timesteps = betas.numel()

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        if cfg.kind == "cosine":
            return cls(cosine_betas(cfg.num_timesteps))
        return cls(linear_sqrt_betas(cfg.beta_start, cfg.beta_end, cfg.num_timesteps))

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Draw z_t ~ q(z_t | z_0) by reparameterisation (DDPM Eq. 4): sqrt(ab) z_0 + sqrt(1-ab) eps."""
        self.check_timesteps(t)
        return gather(self.sqrt_alpha_bar, t, x0) * x0 + gather(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) [B], float32 on t's device."""
        self.check_timesteps(t)
        snr_T = self.alpha_bar / (1.0 - self.alpha_bar)
        return snr_T[t.detach().to("cpu", torch.long)].to(torch.float32).to(t.device)

    def check_timesteps(self, t: Tensor):
        if t.dtype.is_floating_point or t.ndim != 1:
            raise ValueError(f"t has dtype {t.dtype} and shape {tuple(t.shape)}: "
                             "pass integer timesteps of shape [B]")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t outside [0, {self.num_timesteps}): pass 0-based timestep indices")
