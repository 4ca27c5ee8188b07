"""Guidance at sampling time: classifier-free guidance (Ho & Salimans 2022), as used for the LDM text
and class models, and guiding by the gradient of a log-likelihood (App. C): of a classifier of noisy
latents (Eq. 16, the LDM-8-G rows of Tab. 3/10) or of the decoded prediction (Eq. 17, image guiding).

Classifier-free: one network is trained with the condition sometimes replaced by an "empty" one; at
sampling time the prediction is extrapolated away from the unconditional one:
    out = out_u + scale * (out_c - out_u)
scale = 1 is the plain conditional model; the LDM paper samples its text-to-image model with
scale > 1 (Sec. 4.3.1).
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.objectives import Model, check_objective, x0_eps_from_output
from ldm.diffusion.schedules import NoiseSchedule, gather

Cond = Tensor | dict[str, Tensor]  # context tensor [B, ...] or named conditioning tensors
ConditionalModel = Callable[[Tensor, Tensor, Cond], Tensor]  # model_c(x_t_BCHW, t_B, cond) -> out


def _cat_pair(cond: Cond, uncond: Cond) -> Cond:
    """Stack cond over uncond along the batch, for a single batched model call."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or cond.keys() != uncond.keys():
            raise ValueError("cond and uncond must both be dicts with the same keys")
        return {key: _cat_pair(cond[key], uncond[key]) for key in cond}
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ: "
                         "expand uncond to cond's shape (e.g. uncond.expand_as(cond))")
    return torch.cat([cond, uncond])


def classifier_free_guidance(model_c: ConditionalModel, cond: Cond, uncond: Cond, scale: float, *,
                             t_max: int | None = None) -> Model:
    """Wrap model_c into model(x_t, t) -> out_u + scale * (out_c - out_u), one batched call.

    With t_max set, guidance applies only where t <= t_max and the plain conditional output is
    used above it (a guidance interval: strong guidance at the noisiest steps mostly costs
    diversity). Where guidance is off for the whole batch, and always for scale == 1, the
    unconditional half is not evaluated and the result is exactly model_c(x, t, cond).
    """
    cond_and_uncond = _cat_pair(cond, uncond)

    def guided(x_t: Tensor, t_B: Tensor) -> Tensor:
        guide_B = torch.ones_like(t_B, dtype=torch.bool) if t_max is None else t_B <= t_max
        if scale == 1.0 or not bool(guide_B.any()):
            return model_c(x_t, t_B, cond)
        out_c, out_u = model_c(torch.cat([x_t, x_t]), torch.cat([t_B, t_B]), cond_and_uncond).chunk(2)
        out = out_u + scale * (out_c - out_u)
        return torch.where(guide_B.reshape(-1, *([1] * (out.ndim - 1))), out, out_c)

    return guided


# ------------------------------------------------------------------ guiding by a gradient (App. C)
#
# Sign of Eq. 16. The score identity of a Gaussian perturbation, z_t = sqrt(ab) z_0 + sigma_t eps with
# sigma_t = sqrt(1 - ab), is  eps_theta(z_t, t) ~= -sigma_t * grad_{z_t} log p(z_t)  (the network
# estimates the noise, which points AWAY from high density). Bayes adds the guide's term to the score:
# grad log p(z_t | y) = grad log p(z_t) + grad log p(y | z_t). Multiplying by -sigma_t gives
#     eps_hat = eps_theta(z_t, t) - sigma_t * grad_{z_t} log p(y | z_t),
# the form of Dhariwal & Nichol's Algorithm 2. The paper prints Eq. 16 with "+"; with its own definition
# of eps_theta that "+" would move the sample to LOWER likelihood of y, so we subtract.
# tests/test_guidance.py checks this against the exact conditional noise of a Gaussian toy problem, and
# checks that the "+" sign lowers the target's likelihood.

LogLikelihood = Callable[[Tensor, Tensor, Tensor], Tensor]  # log_p(z_t, t_B, z0_hat) -> [B] log p(y | .)


def _output_from_eps(objective: str, eps: Tensor, x_t: Tensor, sqrt_ab: Tensor, sqrt_1m_ab: Tensor) -> Tensor:
    """The prediction of `objective` that implies (eps, x_t): the inverse of x0_eps_from_output."""
    x0 = (x_t - sqrt_1m_ab * eps) / sqrt_ab
    return {"eps": eps, "x0": x0, "v": sqrt_ab * eps - sqrt_1m_ab * x0}[objective]


def gradient_guidance(model: Model, log_likelihood: LogLikelihood, schedule: NoiseSchedule, scale: float, *,
                      objective: str = "eps", through_model: bool = True) -> Model:
    """Wrap `model` so that it predicts eps_hat = eps - scale * sigma_t * grad_{z_t} log p(y | z_t) (see the
    sign note above), returned in the model's own `objective`.

    log_likelihood(z_t, t_B, z0_hat) -> [B]: log p(y | .) per sample (any differentiable function of
    z_t or of the predicted clean latent z0_hat). through_model=True (image guiding, Eq. 17) takes the
    gradient through the network's z0_hat(z_t); False (a classifier of noisy latents, Eq. 16) calls the
    model without gradients and differentiates log p(y | z_t, t) in z_t alone. Works inside the
    samplers' torch.no_grad(); scale = 0 returns the model itself.
    """
    check_objective(objective)
    if scale == 0:
        return model

    def guided(x_t: Tensor, t_B: Tensor) -> Tensor:
        sqrt_ab = gather(schedule.sqrt_alpha_bar, t_B, x_t).float()
        sqrt_1m_ab = gather(schedule.sqrt_one_minus_alpha_bar, t_B, x_t).float()
        with torch.enable_grad():
            z_t = x_t.detach().requires_grad_(True)
            with torch.set_grad_enabled(through_model):
                out = model(z_t, t_B).float()
            x0, eps = x0_eps_from_output(objective, out, z_t.float(), sqrt_ab, sqrt_1m_ab)
            log_p = log_likelihood(z_t, t_B, x0)
            if log_p.shape != (x_t.shape[0],):
                raise ValueError(f"log_likelihood returned shape {tuple(log_p.shape)}: return one value per "
                                 f"sample, [{x_t.shape[0]}]")
            (grad,) = torch.autograd.grad(log_p.sum(), z_t)
        eps_hat = eps.detach() - scale * sqrt_1m_ab * grad.float()
        return _output_from_eps(objective, eps_hat, x_t.float(), sqrt_ab, sqrt_1m_ab).to(out.dtype)

    return guided


def downsample(x_BCHW: Tensor, factor: int) -> Tensor:
    """T of Eq. 17 for upscaling: anti-aliased bicubic downsampling by an integer factor (1: identity)."""
    if factor == 1:
        return x_BCHW
    size = (x_BCHW.shape[-2] // factor, x_BCHW.shape[-1] // factor)
    return F.interpolate(x_BCHW, size=size, mode="bicubic", align_corners=False, antialias=True)


def image_guide(decode: Callable[[Tensor], Tensor], target_BCHW: Tensor, *, downsample_factor: int = 1,
                distance: Callable[[Tensor, Tensor], Tensor] | None = None) -> LogLikelihood:
    """The image guider of Eq. 17 as a LogLikelihood for `gradient_guidance(through_model=True)`.

    x_hat = T(decode(z0_hat)) with T = `downsample` by `downsample_factor`; log p(y | z_t) is
    -1/2 ||y - x_hat||^2 summed over each image (a Gaussian of unit variance, the L2 guider), or
    -distance(x_hat, y) per image (e.g. LPIPS, the perceptual guider of the SR guiding rows of Tab. 5).
    target_BCHW: y, in decode's range ([-1, 1] for the first stages here), of x_hat's size.
    """
    def log_likelihood(z_t: Tensor, t_B: Tensor, z0_hat: Tensor) -> Tensor:
        x_hat = downsample(decode(z0_hat).float(), downsample_factor)
        target = target_BCHW.to(x_hat.device, x_hat.dtype)
        if x_hat.shape != target.shape:
            raise ValueError(f"guide target {tuple(target.shape)} differs from the decoded sample after the "
                             f"transform {tuple(x_hat.shape)} (downsampled by {downsample_factor}): give targets of "
                             f"{x_hat.shape[-2]}x{x_hat.shape[-1]} px, or change the downsampling factor")
        if distance is not None:
            return -distance(x_hat, target)
        return -0.5 * (target - x_hat).square().flatten(1).sum(dim=1)

    return log_likelihood
