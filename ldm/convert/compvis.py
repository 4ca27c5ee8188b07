"""The CompVis checkpoint layout: one state dict holding every part of a latent diffusion model.

A released LDM / Stable Diffusion checkpoint (`ckpt["state_dict"]`) stores
    first_stage_model.*       the frozen autoencoder (Sec. 3.1)
    model.diffusion_model.*   the UNet epsilon_theta (Sec. 3.3)
    cond_stage_model.*        the conditioner tau_theta (Eq. 3)
    model_ema.*               EMA copies of the UNet weights, under LitEma's flattened names
and, unprefixed, the buffers of the DDPM wrapper (betas, alphas_cumprod, ..., scale_factor).
Our autoencoders and UNet use the CompVis parameter names, so loading them is prefix
handling. The class embedding loads as it is; the paper's text transformer is stored as the
x-transformers `BERTEmbedder` (`cond_stage_model.transformer.*`), which ldm/convert/bert.py maps
to and from our `TextTransformer`.

Pure functions of state dicts: the caller reads the file (`torch.load(..., weights_only=True)`
or safetensors) and passes the tensors in.
"""
import torch
from torch import nn

from ldm.convert.unet import unet_keys
from ldm.diffusion.unet import UNetConfig

COMPVIS_PREFIXES = {"autoencoder": "first_stage_model.", "unet": "model.diffusion_model.",
                    "conditioner": "cond_stage_model.", "ema": "model_ema."}
OTHER = "other"  # unprefixed keys: the DDPM wrapper's schedule buffers and scale_factor
EMA_BOOKKEEPING = ("decay", "num_updates")  # LitEma's own buffers, not weights
EMA_UNET_PREFIX = "diffusion_model"  # LitEma tracks `DiffusionWrapper`, whose UNet is `diffusion_model`
FIRST_STAGE_LOSS_PREFIX = "loss."
NUM_KEYS_SHOWN = 10


def split_compvis_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of a CompVis checkpoint, prefixes stripped.

    Returns every key of COMPVIS_PREFIXES ("autoencoder", "unet", "conditioner", "ema") and
    "other", each a (possibly empty) state dict. "ema" keeps LitEma's flattened names
    (`diffusion_modelinput_blocks00weight`); `compvis_ema_to_unet` maps them to UNet keys.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (*COMPVIS_PREFIXES, OTHER)}
    for key, tensor in state_dict.items():
        name = next((n for n, p in COMPVIS_PREFIXES.items() if key.startswith(p)), OTHER)
        parts[name][key.removeprefix(COMPVIS_PREFIXES.get(name, ""))] = tensor
    return parts


def join_compvis_state_dict(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of `split_compvis_state_dict`: one CompVis-layout state dict from its parts."""
    unknown = sorted(set(parts) - {*COMPVIS_PREFIXES, OTHER})
    if unknown:
        raise ValueError(f"unknown checkpoint parts {unknown}; use {sorted(COMPVIS_PREFIXES)} or {OTHER!r}")
    joined = {}
    for name, part in parts.items():
        joined |= {COMPVIS_PREFIXES.get(name, "") + key: tensor for key, tensor in part.items()}
    return joined


def first_stage_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder weights of a standalone CompVis first-stage checkpoint.

    Drops `loss.*`: the patch discriminator and LPIPS network of the first-stage objective
    (Eq. 25) are training-only and not part of the autoencoder module.
    """
    return {k: v for k, v in state_dict.items() if not k.startswith(FIRST_STAGE_LOSS_PREFIX)}


def _flatten(key: str) -> str:
    return EMA_UNET_PREFIX + key.replace(".", "")


def compvis_ema_to_unet(ema_state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """LitEma's flattened EMA names (the "ema" part of a split checkpoint) -> our UNet keys.

    Dots are gone from the stored names, so the mapping needs the UNet's key list (from
    `cfg`). LitEma's `decay` / `num_updates` are dropped; names that match no UNet key are
    kept as they are, so `load_into` reports them as unexpected.
    """
    keys = unet_keys(cfg)
    flat_to_key = {_flatten(k): k for k in keys}
    if len(flat_to_key) != len(keys):
        raise ValueError("two UNet keys of this config flatten to the same EMA name; "
                         "its EMA weights cannot be mapped back from the CompVis layout")
    return {flat_to_key.get(k, k): v for k, v in ema_state_dict.items() if k not in EMA_BOOKKEEPING}


def unet_to_compvis_ema(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (EMA) UNet state dict -> the "ema" part of a CompVis checkpoint (LitEma's names).

    LitEma's `decay` / `num_updates` are not written: CompVis loads checkpoints non-strictly.
    """
    return {_flatten(k): v for k, v in state_dict.items()}


def _mismatch_report(what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    lines = [f"{what}: the state dict does not fit the module ({len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(shapes)} with another shape)"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs module)", shapes)):
        if keys:
            more = f" ... and {len(keys) - NUM_KEYS_SHOWN} more" if len(keys) > NUM_KEYS_SHOWN else ""
            lines.append(f"  {label}: {keys[:NUM_KEYS_SHOWN]}{more}")
    lines.append("Build the module from the config the checkpoint was trained with (preset, widths, "
                 "attention levels), and pass the right part of the checkpoint.")
    return "\n".join(lines)


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Load `state_dict` into `module` strictly; on any mismatch raise ValueError naming `what`
    and listing missing, unexpected and wrongly shaped keys (the first few of each, with counts)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(_mismatch_report(what, missing, unexpected, shapes))
    module.load_state_dict(state_dict, strict=True)
