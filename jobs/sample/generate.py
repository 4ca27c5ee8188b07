"""Sampling a trained LDM: z_T ~ N(0, I) -> z_0 with DDIM / PLMS / DDPM and classifier-free guidance,
then x = D(z_0 / scale_factor) with the first stage (Sec. 3.2-3.3, App. G).

    cfg = SamplingConfig(sampler="ddim", num_steps=50, guidance_scale=5.0, precision="bf16")
    images = generate(bundle, Conditions(prompts=["a red circle"] * 4), seeds_for(range(4), seed=0),
                      cfg, torch.device("cuda"))           # uint8 [4, H, W, 3] on the CPU

Determinism by global index: sample i's initial noise z_T, and the noise of every stochastic step
(DDPM, DDIM with eta > 0), come from its own CPU torch.Generator seeded with seeds[i] alone. So a
sample does not depend on the batch size, on which samples share its batch, on the number of ranks,
nor (up to float rounding) on the device. Jobs use `seeds_for`: sample seed = base seed + global
index, so any sample is regenerated alone from its index.

Convolutional sampling beyond the training resolution (Sec. 4.3.2): the UNet is fully
convolutional, so `height` x `width` (pixels) just sample a larger latent [C, height / f, width / f];
both must be multiples of f times the UNet's downsampling.
"""
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from jobs.sample.conditions import (
    Conditions,
    check_conditions,
    condition_pair,
    unet_with_conditions,
)
from ldm.autoencoder.config import AUTOENCODER_PRESETS
from ldm.diffusion.classifier import classifier_log_likelihood
from ldm.diffusion.guidance import classifier_free_guidance, gradient_guidance, image_guide
from ldm.diffusion.objectives import Model
from ldm.diffusion.samplers import SAMPLERS

PRECISIONS = ("fp32", "bf16")
OUTPUTS = ("images", "latents")
IMAGE_GUIDANCE_LOSSES = ("l2", "lpips")
LPIPS_MIN_SIDE = 16  # VGG16's fourth pooling leaves 1 px of a 16 px image
MAX_SEED = 2**63


@dataclass
class SamplingConfig:
    """How to sample (the `sampling` group of jobs.sample and jobs.evaluate)."""
    sampler: str = "ddim"                 # ddim | plms | ddpm (ldm.diffusion.samplers)
    num_steps: int = 50                   # respaced steps of the T = 1000 chain
    eta: float = 0.0                      # DDIM only (Eq. 16): 0 deterministic, 1 the DDPM posterior
    guidance_scale: float = 1.0           # classifier-free guidance s; 1.0 = the conditional model alone
    guidance_t_max: int | None = None     # guide only at t <= this (a guidance interval); None: every step
    clip_x0: float | None = None          # clamp the predicted z_0 to [-c, c] at every step; None: off
    precision: str = "fp32"               # bf16: autocast around tau_theta and the UNet (sampler maths fp32)
    height: int | None = None             # image pixels; None: the training size (latent side x f)
    width: int | None = None
    batch_size: int = 16                  # samples per UNet batch (twice that with guidance)
    # Image guiding (App. C, Eq. 17): eps - scale * sigma_t * grad log p(y | T(D(z0_hat))), y the guide targets
    image_guidance_scale: float = 0.0     # 0: off; > 0 needs one guide target per sample (jobs.sample guide_images=)
    image_guidance_downsample: int = 1    # T: anti-aliased bicubic downsampling by this factor (1: identity)
    image_guidance_loss: str = "l2"       # l2: -1/2 ||y - T(x)||^2 | lpips: -LPIPS(T(x), y) (needs its weights)
    # Classifier guidance (App. D.4, Eq. 16): eps - scale * sigma_t * grad_{z_t} log p_phi(class_id | z_t)
    classifier_scale: float = 0.0         # 0: off; > 0 needs a classifier of noisy latents; LDM-8-G (Tab. 10): 10

    def __post_init__(self):
        checks = [
            (self.sampler in SAMPLERS, f"sampling.sampler={self.sampler!r}: use one of {sorted(SAMPLERS)}"),
            (self.num_steps >= 1, f"sampling.num_steps={self.num_steps}: must be >= 1"),
            (self.eta >= 0, f"sampling.eta={self.eta}: must be >= 0"),
            (self.sampler == "ddim" or self.eta == 0,
             f"sampling.eta={self.eta} applies to sampler=ddim only; set sampling.eta=0 for {self.sampler}"),
            (self.guidance_t_max is None or self.guidance_t_max >= 0,
             f"sampling.guidance_t_max={self.guidance_t_max}: a timestep >= 0, or null for every step"),
            (self.clip_x0 is None or self.clip_x0 > 0, f"sampling.clip_x0={self.clip_x0}: positive, or null"),
            (self.precision in PRECISIONS, f"sampling.precision={self.precision!r}: use one of {PRECISIONS}"),
            (self.batch_size >= 1, f"sampling.batch_size={self.batch_size}: must be >= 1"),
            (self.image_guidance_scale >= 0,
             f"sampling.image_guidance_scale={self.image_guidance_scale}: must be >= 0 (0: off)"),
            (self.image_guidance_downsample >= 1,
             f"sampling.image_guidance_downsample={self.image_guidance_downsample}: an integer factor >= 1"),
            (self.image_guidance_loss in IMAGE_GUIDANCE_LOSSES,
             f"sampling.image_guidance_loss={self.image_guidance_loss!r}: use one of {IMAGE_GUIDANCE_LOSSES}"),
            (self.classifier_scale >= 0, f"sampling.classifier_scale={self.classifier_scale}: must be >= 0 (0: off)"),
        ]
        checks += [(side is None or side > 0, f"sampling.{key}={side}: positive pixels, or null for the "
                    "training size") for key, side in (("height", self.height), ("width", self.width))]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def seeds_for(indices: Iterable[int], seed: int) -> list[int]:
    """The seed of each global sample index: base seed + index (the rule jobs.sample records)."""
    return [seed + int(i) for i in indices]


def describe(bundle) -> str:
    """'preset debug-t2i from runs/x' for messages."""
    return f"preset {bundle.preset_name} from {(bundle.source or {}).get('path')}"


def first_stage_factor(bundle) -> int:
    """f of the first stage: the bundle's autoencoder when it has one, else the preset's."""
    ae_cfg = getattr(bundle.autoencoder, "cfg", None) or AUTOENCODER_PRESETS[bundle.preset.autoencoder]
    return ae_cfg.downsample_factor


def image_size(bundle, cfg: SamplingConfig, conditions: Conditions) -> tuple[int, int]:
    """(height, width) of the images: sampling.height / width, else the natural size for the conditions
    (inpainting: the image's; semantic: the map's; super-resolution: the low-res image's x f; else the
    training size)."""
    f = first_stage_factor(bundle)
    if conditions.masks is not None:
        natural, what = tuple(conditions.images.shape[-2:]), "the image to inpaint"
        if (cfg.height or natural[0], cfg.width or natural[1]) != natural:
            raise ValueError(f"sampling.height/width={cfg.height}x{cfg.width} differ from {what} "
                             f"({natural[0]}x{natural[1]}): leave them null when inpainting")
    elif conditions.maps is not None:  # semantic synthesis: a map per pixel of the image
        natural, what = tuple(conditions.maps.shape[-2:]), "the segmentation map"
        if (cfg.height or natural[0], cfg.width or natural[1]) != natural:
            raise ValueError(f"sampling.height/width={cfg.height}x{cfg.width} differ from {what} "
                             f"({natural[0]}x{natural[1]}): leave them null, or give a map of the size wanted "
                             "(a larger map samples a larger image, Sec. 4.3.2)")
    elif conditions.images is not None:  # super-resolution: the low-res image lives on the latent grid
        natural, what = tuple(s * f for s in conditions.images.shape[-2:]), "the low-res image x f"
        if (cfg.height or natural[0], cfg.width or natural[1]) != natural:
            low = conditions.images.shape[-2:]
            raise ValueError(f"sampling.height/width={cfg.height}x{cfg.width}, but the low-res images are "
                             f"{low[0]}x{low[1]}, which x f={f} gives {natural[0]}x{natural[1]}: leave them null, "
                             f"or give low-res images of {(cfg.height or natural[0]) // f}x"
                             f"{(cfg.width or natural[1]) // f} (a larger input samples a larger image, Sec. 4.3.2)")
    else:
        natural, what = tuple(s * f for s in bundle.latent_shape[1:]), "the training size"
    size = (cfg.height or natural[0], cfg.width or natural[1])
    multiple = f * bundle.preset.unet.downsample_factor
    for key, side, set_by_user in (("height", size[0], cfg.height), ("width", size[1], cfg.width)):
        if side % multiple:
            source = f"sampling.{key}={side}" if set_by_user else f"the {key} {side} of {what}"
            raise ValueError(f"{source} is not a multiple of {multiple} (first stage f={f} x the UNet's "
                             f"downsampling {multiple // f}): set sampling.{key} to e.g. "
                             f"{max(multiple, round(side / multiple) * multiple)}")
    return size


def check_request(bundle, conditions: Conditions, seeds: Sequence[int], cfg: SamplingConfig,
                  output: str = "images", classifier=None) -> None:
    """Every check `generate` makes before sampling (ValueError saying what to change); jobs call it
    early with one sample to fail before any work."""
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}: use one of {OUTPUTS}")
    if output == "images" and bundle.autoencoder is None:
        raise ValueError(f"the model ({describe(bundle)}) has no first-stage autoencoder to decode latents: pass "
                         "autoencoder=<folder or spec> when loading it, or ask for output='latents'")
    bad = [s for s in seeds if not 0 <= s < MAX_SEED]
    if bad:
        raise ValueError(f"seeds {bad[:3]} outside [0, 2**63): use non-negative seeds")
    _check_classifier(bundle, cfg, classifier)
    check_conditions(bundle, conditions, len(seeds))
    if bundle.preset.conditioner.kind == "none" and cfg.guidance_scale != 1.0:
        raise ValueError(f"sampling.guidance_scale={cfg.guidance_scale}: preset {bundle.preset_name!r} is "
                         "unconditional, there is nothing to guide with; set sampling.guidance_scale=1")
    size = image_size(bundle, cfg, conditions)
    _check_guide(cfg, conditions, size)
    if classifier is not None:
        latent_chw = (bundle.latent_shape[0], *(side // first_stage_factor(bundle) for side in size))
        trained_chw = (classifier.cfg.in_channels, *classifier.latent_hw)
        if trained_chw != latent_chw:
            raise ValueError(f"the classifier was trained on latents {trained_chw}, these samples are latents "
                             f"{latent_chw} ({size[0]}x{size[1]} px): sample at the size it was trained for "
                             "(sampling.height/width), or train a classifier for this size")


def _check_classifier(bundle, cfg: SamplingConfig, classifier) -> None:
    """Classifier guidance: a classifier and a scale > 0 together, on a class model with its classes."""
    if classifier is None:
        if cfg.classifier_scale > 0:
            raise ValueError(f"sampling.classifier_scale={cfg.classifier_scale} needs a classifier of noisy latents "
                             "(jobs.sample classifier=DIR, the out_dir of jobs.train_classifier)")
        return
    if cfg.classifier_scale == 0:
        raise ValueError("a classifier is given but sampling.classifier_scale=0: set a scale > 0 (LDM-8-G uses 10), "
                         "or drop the classifier")
    conditioner = bundle.preset.conditioner
    if conditioner.kind != "class":
        raise ValueError(f"classifier guidance steers each sample towards its class_id, and preset "
                         f"{bundle.preset_name!r} is not class-conditional ({conditioner.kind!r} conditioner): "
                         "sample a class-conditional model, or drop the classifier")
    if classifier.num_classes != conditioner.num_classes:
        raise ValueError(f"the classifier has {classifier.num_classes} classes, preset {bundle.preset_name!r} has "
                         f"{conditioner.num_classes}: train the classifier for this model (jobs.train_classifier)")


def _check_guide(cfg: SamplingConfig, conditions: Conditions, size: tuple[int, int]) -> None:
    targets, factor = conditions.guide_targets, cfg.image_guidance_downsample
    if cfg.image_guidance_scale == 0:
        if targets is not None:
            raise ValueError("guide targets given but sampling.image_guidance_scale=0: set a scale > 0 to guide, "
                             "or drop the targets")
        return
    if targets is None:
        raise ValueError(f"sampling.image_guidance_scale={cfg.image_guidance_scale} needs a guide target per sample "
                         "(jobs.sample guide_images=FILE_OR_FOLDER)")
    if size[0] % factor or size[1] % factor:
        raise ValueError(f"sampling.image_guidance_downsample={factor} does not divide the image size "
                         f"{size[0]}x{size[1]}: choose a factor of both sides")
    wanted = (size[0] // factor, size[1] // factor)
    if targets.ndim != 4 or targets.shape[1] != 3 or tuple(targets.shape[-2:]) != wanted:
        raise ValueError(f"guide targets {tuple(targets.shape)}: image guiding compares the {size[0]}x{size[1]} "
                         f"samples downsampled by {factor} with RGB targets of {wanted[0]}x{wanted[1]} px; give targets "
                         "of that size, or set sampling.image_guidance_downsample to the ratio of the sizes")
    if cfg.image_guidance_loss == "lpips" and min(wanted) < LPIPS_MIN_SIDE:
        raise ValueError(f"LPIPS compares images of at least {LPIPS_MIN_SIDE} px, the guide targets are "
                         f"{wanted[0]}x{wanted[1]}: lower sampling.image_guidance_downsample or use image_guidance_loss=l2")


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: the same noise on every device and in every batch."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def initial_noise(generators: Sequence[torch.Generator], latent_chw: tuple[int, int, int]) -> Tensor:
    """z_T [B, C, h, w] (float32, CPU): sample i drawn from generators[i] alone."""
    return torch.stack([torch.randn(latent_chw, generator=g) for g in generators])


def guided_model(bundle, conditions: Conditions, cfg: SamplingConfig, latent_hw: tuple[int, int],
                 device: torch.device, lpips=None, classifier=None) -> Model:
    """model(z_t, t) for the sampler: the UNet with this batch's conditions, classifier-free guidance and,
    with guide targets, image guiding on top (App. C), and with a classifier, classifier guidance towards
    each sample's class_id outermost (Eq. 16: it calls the model without gradients, so an image guide
    inside keeps its own)."""
    pair = condition_pair(bundle, conditions, latent_hw, device)
    if pair is None:
        def model(z_t_BCHW: Tensor, t_B: Tensor) -> Tensor:
            return bundle.unet(z_t_BCHW, t_B)
    else:
        model = classifier_free_guidance(unet_with_conditions(bundle.unet), pair[0], pair[1], cfg.guidance_scale,
                                         t_max=cfg.guidance_t_max)
    if conditions.guide_targets is not None and cfg.image_guidance_scale != 0:
        model = _image_guided(model, bundle, conditions, cfg, device, lpips)
    if classifier is None or cfg.classifier_scale == 0:
        return model
    labels_B = torch.tensor([int(c) for c in conditions.class_ids], dtype=torch.long, device=device)
    return gradient_guidance(model, classifier_log_likelihood(classifier, labels_B), bundle.schedule,
                             cfg.classifier_scale, objective=bundle.objective, through_model=False)


def _image_guided(model: Model, bundle, conditions: Conditions, cfg: SamplingConfig, device: torch.device,
                  lpips) -> Model:
    if cfg.image_guidance_loss == "lpips" and lpips is None:
        raise ValueError("sampling.image_guidance_loss=lpips needs the LPIPS network: pass lpips= "
                         "(pipeline.models.weights.load_lpips)")
    distance = lpips.to(device) if cfg.image_guidance_loss == "lpips" else None
    log_p = image_guide(lambda z: decode(bundle, z, clamp=False), conditions.guide_targets.to(device),
                        downsample_factor=cfg.image_guidance_downsample, distance=distance)
    return gradient_guidance(model, log_p, bundle.schedule, cfg.image_guidance_scale, objective=bundle.objective)


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def to_uint8(x_BCHW: Tensor) -> Tensor:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3] on the CPU."""
    return ((x_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def decode(bundle, z_BCHW: Tensor, clamp: bool = True) -> Tensor:
    """x = D(z / scale_factor), float32 (App. G: the model sees scale_factor * z), clamped to [-1, 1]
    unless `clamp` is off (image guiding differentiates through it: a clamp would cut the gradient)."""
    x = bundle.autoencoder.decode(z_BCHW.float() / bundle.scale_factor).float()
    return x.clamp(-1, 1) if clamp else x


@torch.no_grad()
def _generate_batch(bundle, conditions: Conditions, seeds: list[int], cfg: SamplingConfig,
                    device: torch.device, latent_chw: tuple[int, int, int], output: str, lpips=None,
                    classifier=None) -> Tensor:
    generators = sample_generators(seeds)
    z_T = initial_noise(generators, latent_chw).to(device)
    eta = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    with _autocast(cfg.precision, device):
        model = guided_model(bundle, conditions, cfg, latent_chw[1:], device, lpips, classifier)
        z_0 = SAMPLERS[cfg.sampler](model, z_T, bundle.schedule, num_steps=cfg.num_steps,
                                    objective=bundle.objective, clip_x0=cfg.clip_x0, generator=generators, **eta)
    if output == "latents":
        return z_0.float().cpu()
    x = decode(bundle, z_0)
    if conditions.masks is not None:  # inpainting: keep the known pixels, as the CompVis script does
        fill = conditions.masks.to(device) > 0.5
        x = torch.where(fill, x, conditions.images.to(device, x.dtype))
    return to_uint8(x)


def generate(bundle, conditions: Conditions, seeds: Sequence[int], cfg: SamplingConfig, device: torch.device,
             *, output: str = "images", progress: Callable[[int], None] | None = None, lpips=None,
             classifier=None) -> Tensor:
    """Sample len(seeds) images from `bundle` (a pipeline.models.bundle.LDMBundle), sample i from seeds[i]
    and the i-th entry of `conditions`, in batches of cfg.batch_size on `device`.

    output="images": uint8 [N, H, W, 3] on the CPU (RGB, what PIL saves); needs bundle.autoencoder.
    output="latents": float32 [N, C, h, w] on the CPU, z_0 as the model sees it (scaled, App. G).
    progress(k) is called after each batch with the k samples it made. The bundle is moved to `device`.
    lpips: the LPIPS network of sampling.image_guidance_loss=lpips.
    classifier: the ldm.diffusion.classifier.LatentClassifier of sampling.classifier_scale > 0 (moved to `device`).
    ValueError (before any work) for conditions that do not fit the model, sizes that are not
    multiples of f x the UNet's downsampling, or a missing autoencoder.
    """
    seeds = [int(s) for s in seeds]
    check_request(bundle, conditions, seeds, cfg, output, classifier)
    height, width = image_size(bundle, cfg, conditions)
    f = first_stage_factor(bundle)
    latent_chw = (bundle.latent_shape[0], height // f, width // f)
    bundle = bundle.to(device)
    classifier = None if classifier is None else classifier.to(device)
    batches = []
    for start in range(0, len(seeds), cfg.batch_size):
        stop = min(start + cfg.batch_size, len(seeds))
        batches.append(_generate_batch(bundle, conditions.select(start, stop), seeds[start:stop], cfg, device,
                                       latent_chw, output, lpips, classifier))
        if progress is not None:
            progress(stop - start)
    if not batches:
        empty = (0, height, width, 3) if output == "images" else (0, *latent_chw)
        return torch.empty(empty, dtype=torch.uint8 if output == "images" else torch.float32)
    return torch.cat(batches)
