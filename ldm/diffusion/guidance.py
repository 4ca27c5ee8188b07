"""Classifier-free guidance (Ho & Salimans 2022), as used for the LDM text and class models.

One network is trained with the condition sometimes replaced by an "empty" one; at sampling
time the prediction is extrapolated away from the unconditional one:
    out = out_u + scale * (out_c - out_u)
scale = 1 is the plain conditional model; the LDM paper samples its text-to-image model with
scale > 1 (Sec. 4.3.1).
"""
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.objectives import Model

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
