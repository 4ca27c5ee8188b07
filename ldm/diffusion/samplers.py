"""Samplers for the reverse process p_theta(z_{t-1} | z_t) (Sec. 3.2).

All samplers share one signature:
    sampler(model, x_T, schedule, *, num_steps, objective, clip_x0, eta, generator) -> x_0
where `model(x_t_BCHW, t_B) -> prediction` is any callable (e.g. a classifier-free-guided
UNet closure) predicting `objective` ("eps", "v" or "x0"). They visit `timesteps(schedule,
num_steps)` in descending order; after the last step comes "t = -1" with alpha_bar = 1, so
the final update returns the predicted x_0. Update math runs in float32 whatever the model
returns; the model is fed x_t in x_T's dtype, and x_0 is returned in x_T's dtype.

`clip_x0 = c` clamps the predicted x_0 to [-c, c] and recomputes eps from it, so that
(x_0, eps) stay consistent with x_t (x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps) and DDIM with
eta = 1 remains the DDPM posterior even with clipping.

`generator` is one torch.Generator for the whole batch, or a sequence of one generator per sample:
then sample i's noise at every stochastic step is drawn from generator i alone (on that
generator's device, then moved to x_T's), so a sample does not depend on which other samples
share its batch, nor on the batch size.
"""
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ldm.diffusion.objectives import Model, check_objective, x0_eps_from_output
from ldm.diffusion.schedules import NoiseSchedule

Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample

# Adams-Bashforth weights on (eps_t, eps_{t+1}, eps_{t+2}, eps_{t+3}), newest first: PNDM's pseudo
# linear multistep, order by how much history there is.
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def timesteps(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """Descending respaced timesteps [num_steps]: always starts at T-1; all of T-1..0 when num_steps == T.

    "Trailing" spacing (Lin et al. 2024, Tab. 2): starting at T-1 means the first step sees
    the noise level the model was trained on and that x_T ~ N(0, I) approximates best.
    """
    num_timesteps = schedule.num_timesteps
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps={num_steps!r}: set an integer in [1, {num_timesteps}]")
    offsets = torch.arange(num_steps, dtype=torch.float64) * (num_timesteps / num_steps)
    return (num_timesteps - offsets).round().long() - 1


def _step_pairs(schedule: NoiseSchedule, num_steps: int) -> Iterator[tuple[int, int]]:
    """(t, t_prev) pairs of the respaced chain; t_prev = -1 marks the final step to x_0."""
    ts = timesteps(schedule, num_steps).tolist()
    return zip(ts, ts[1:] + [-1])


def _alpha_bar(schedule: NoiseSchedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alpha_bar[t])  # alpha_bar_{-1} = 1: no noise left


def _clip(x0: Tensor, eps: Tensor, x_t: Tensor, alpha_bar_t: float, clip_x0: float | None):
    if clip_x0 is None:
        return x0, eps
    x0 = x0.clamp(-clip_x0, clip_x0)
    return x0, (x_t - math.sqrt(alpha_bar_t) * x0) / math.sqrt(1.0 - alpha_bar_t)


def _denoise(model: Model, x_t: Tensor, t: int, schedule: NoiseSchedule, objective: str,
             clip_x0: float | None, model_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Evaluate the model at (x_t, t) and return the implied (x0, eps) in float32."""
    t_B = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    out = model(x_t.to(model_dtype), t_B).float()
    alpha_bar_t = _alpha_bar(schedule, t)
    x0, eps = x0_eps_from_output(objective, out, x_t, math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t))
    return _clip(x0, eps, x_t, alpha_bar_t, clip_x0)


def _noise_like(x: Tensor, generator: Generators) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    noise = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generator]
    return torch.stack(noise).to(x.device)


def ddim_sigma(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> float:
    """DDIM Eq. 16: eta = 1 gives the DDPM posterior std, eta = 0 the deterministic sampler."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))


def _ddim_update(x0: Tensor, eps: Tensor, alpha_bar_prev: float, sigma: float,
                 generator: Generators) -> Tensor:
    """DDIM Eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z."""
    direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0))
    x_prev = math.sqrt(alpha_bar_prev) * x0 + direction * eps
    if sigma > 0:
        x_prev = x_prev + sigma * _noise_like(x0, generator)
    return x_prev


def _check_common(x_T: Tensor, objective: str, clip_x0: float | None, generator: Generators):
    check_objective(objective)
    if clip_x0 is not None and clip_x0 <= 0:
        raise ValueError(f"clip_x0={clip_x0}: set a positive bound (e.g. 1.0) or None")
    if x_T.ndim < 2:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}: pass a batch [B, C, ...]")
    if not (generator is None or isinstance(generator, torch.Generator)) and len(generator) != x_T.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x_T.shape[0]}: pass one per sample "
                         "(or a single generator)")


@torch.no_grad()
def sample_ddpm(model: Model, x_T: Tensor, schedule: NoiseSchedule, *, num_steps: int, objective: str = "eps",
                clip_x0: float | None = None, eta: float = 1.0,
                generator: Generators = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Eq. 6-7): z_s ~ q(z_s | z_t, x0_hat), variance beta_tilde.

    With num_steps < T the chain is respaced: the posterior uses beta_{t->s} = 1 - ab_t / ab_s
    (Nichol & Dhariwal 2021, Sec. 4). Only eta = 1 (the posterior variance) is defined here.
    """
    _check_common(x_T, objective, clip_x0, generator)
    if eta != 1.0:
        raise ValueError(f"eta={eta}: DDPM samples the posterior (eta=1); use sample_ddim for other eta")
    x = x_T.float()
    for t, s in _step_pairs(schedule, num_steps):
        x0, _ = _denoise(model, x, t, schedule, objective, clip_x0, x_T.dtype)
        alpha_bar_t, alpha_bar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        beta = 1.0 - alpha_bar_t / alpha_bar_s
        mean = (math.sqrt(alpha_bar_s) * beta / (1 - alpha_bar_t) * x0  # Eq. 7, mu_tilde
                + math.sqrt(1.0 - beta) * (1 - alpha_bar_s) / (1 - alpha_bar_t) * x)
        variance = (1 - alpha_bar_s) / (1 - alpha_bar_t) * beta  # Eq. 7, beta_tilde
        x = mean + math.sqrt(variance) * _noise_like(x, generator) if variance > 0 else mean
    return x.to(x_T.dtype)


@torch.no_grad()
def sample_ddim(model: Model, x_T: Tensor, schedule: NoiseSchedule, *, num_steps: int, objective: str = "eps",
                clip_x0: float | None = None, eta: float = 0.0,
                generator: Generators = None) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12 with sigma from Eq. 16); eta = 0 is deterministic, the
    LDM paper's default sampler; eta = 1 is DDPM's posterior in distribution."""
    _check_common(x_T, objective, clip_x0, generator)
    if eta < 0:
        raise ValueError(f"eta={eta}: set eta >= 0 (0 deterministic, 1 DDPM-like)")
    x = x_T.float()
    for t, s in _step_pairs(schedule, num_steps):
        x0, eps = _denoise(model, x, t, schedule, objective, clip_x0, x_T.dtype)
        alpha_bar_t, alpha_bar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        x = _ddim_update(x0, eps, alpha_bar_s, ddim_sigma(alpha_bar_t, alpha_bar_s, eta), generator)
    return x.to(x_T.dtype)


def _adams_bashforth(eps: Tensor, eps_history: list[Tensor]) -> Tensor:
    """Adams-Bashforth combination of the newest eps and up to three earlier ones (PNDM)."""
    order = min(len(eps_history) + 1, 4)
    recent = [eps] + eps_history[::-1][: order - 1]  # newest first
    return sum(weight * e for weight, e in zip(ADAMS_BASHFORTH[order], recent))


@torch.no_grad()
def sample_plms(model: Model, x_T: Tensor, schedule: NoiseSchedule, *, num_steps: int, objective: str = "eps",
                clip_x0: float | None = None, eta: float = 0.0,
                generator: Generators = None) -> Tensor:
    """PLMS: pseudo linear multistep (Liu et al. 2022, PNDM) as the LDM code uses it.

    The first step is a pseudo improved Euler step (a trial DDIM step, a second model call
    at t_prev, eps averaged); later steps combine the eps history with Adams-Bashforth of
    order 2, 3, 4 and take a deterministic DDIM step with it (PNDM's transfer part, Eq. 9).
    Deterministic, so eta must be 0 and the generator is unused.
    """
    _check_common(x_T, objective, clip_x0, generator)
    if eta != 0.0:
        raise ValueError(f"eta={eta}: PLMS is deterministic; set eta=0 or use sample_ddim")
    x = x_T.float()
    eps_history: list[Tensor] = []
    for t, s in _step_pairs(schedule, num_steps):
        alpha_bar_t, alpha_bar_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        x0, eps = _denoise(model, x, t, schedule, objective, clip_x0, x_T.dtype)
        if not eps_history and s >= 0:
            x_trial = _ddim_update(x0, eps, alpha_bar_s, 0.0, None)
            _, eps_next = _denoise(model, x_trial, s, schedule, objective, clip_x0, x_T.dtype)
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = _adams_bashforth(eps, eps_history)
        eps_history = (eps_history + [eps])[-3:]
        x0 = (x - math.sqrt(1 - alpha_bar_t) * eps_prime) / math.sqrt(alpha_bar_t)
        x0, eps_prime = _clip(x0, eps_prime, x, alpha_bar_t, clip_x0)
        x = _ddim_update(x0, eps_prime, alpha_bar_s, 0.0, None)
    return x.to(x_T.dtype)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "plms": sample_plms}
