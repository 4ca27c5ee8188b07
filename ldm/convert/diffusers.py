"""A trained model as diffusers components: the UNet, the KL autoencoder and the scheduler config.

Pure functions of configs and modules; diffusers is never imported: the config builders return
plain dicts that the export job hands to `UNet2DConditionModel.from_config` /
`AutoencoderKL.from_config` / `DDIMScheduler.from_config` before `save_pretrained`.

A diffusers *pipeline* folder needs a text encoder diffusers knows (CLIP / T5); the paper's
tau_theta is a transformer trained jointly with the UNet (Sec. 4.3.1) that has no diffusers
class. So the export is per component: `unet/`, `vae/` and `scheduler/` subfolders, each written
by the caller with `save_pretrained` and loadable with `<Class>.from_pretrained(folder,
subfolder=...)`, plus the conditioner (and any model diffusers cannot hold: VQ first stages,
self-attention-only or scale-shift UNets) in our own safetensors format. No `model_index.json` is
written, because no diffusers pipeline class could run the result; `diffusers_export_parts`
builds what each subfolder needs.
"""
from typing import NamedTuple

import torch

from ldm.autoencoder.model import AutoencoderKL
from ldm.convert.unet import diffusers_unet_config, unet_to_diffusers
from ldm.convert.vae import autoencoder_to_diffusers, diffusers_vae_config
from ldm.diffusion.objectives import check_objective
from ldm.diffusion.schedules import ScheduleConfig
from ldm.diffusion.unet import UNet

# Our objective names -> diffusers' `prediction_type`.
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# Our schedule kinds -> diffusers' `beta_schedule` with the same betas: "scaled_linear" is linear
# in sqrt(beta) (the LDM schedule), "squaredcos_cap_v2" the iDDPM cosine with beta <= 0.999.
BETA_SCHEDULES = {"linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def diffusers_scheduler_config(cfg: ScheduleConfig, objective: str = "eps") -> dict:
    """`DDIMScheduler.from_config` arguments that reproduce `ldm.diffusion.samplers.sample_ddim` on this schedule.

    Trailing timestep spacing, as `ldm.diffusion.samplers.timesteps`; alpha_bar = 1 after the last step
    (`set_alpha_to_one`), so the last update returns the predicted x_0; no x_0 clipping (our
    default `clip_x0=None`). diffusers steps from t to t - T // num_steps, so the two samplers
    visit the same timesteps only when num_steps divides num_timesteps.
    """
    check_objective(objective)
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": cfg.num_timesteps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
        "beta_schedule": BETA_SCHEDULES[cfg.kind], "prediction_type": PREDICTION_TYPES[objective],
        "timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 0,
        "clip_sample": False, "thresholding": False,
    }


class DiffusersPart(NamedTuple):
    """One subfolder of a diffusers export: `from_config(config)`, load `state_dict`, `save_pretrained`."""
    config: dict
    state_dict: dict[str, torch.Tensor] | None  # None for the scheduler, which has no weights


def diffusers_export_parts(unet: UNet, autoencoder: AutoencoderKL, schedule: ScheduleConfig, *,
                           latent_size: int | tuple[int, int], scaling_factor: float,
                           objective: str = "eps") -> dict[str, DiffusersPart]:
    """The `unet`, `vae` and `scheduler` subfolders of a diffusers export of a trained LDM.

    `scaling_factor` is the latent scale the UNet was trained with (App. G); the conditioner is
    exported separately in our format (see the module docstring).
    """
    if not isinstance(autoencoder, AutoencoderKL):
        raise ValueError(f"{type(autoencoder).__name__} has no diffusers counterpart here; only KL "
                         "autoencoders export to diffusers (export VQ models in our own format)")
    return {
        "unet": DiffusersPart(diffusers_unet_config(unet.cfg, latent_size),
                              unet_to_diffusers(unet.state_dict(), unet.cfg)),
        "vae": DiffusersPart(diffusers_vae_config(autoencoder.cfg, scaling_factor),
                             autoencoder_to_diffusers(autoencoder.state_dict(), autoencoder.cfg)),
        "scheduler": DiffusersPart(diffusers_scheduler_config(schedule, objective), None),
    }
