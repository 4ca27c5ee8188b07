"""What a sample is conditioned on, and how it reaches the UNet (Sec. 3.3, Sec. 4.3-4.5).

`Conditions` holds one entry per sample, of exactly the kind the model was trained with:
    text ("text" conditioner)        prompts      -> bundle.tokenizer -> tau_theta -> context [B, L, D]
    layout ("layout")                 layouts      boxes -> layout tokens (bundle.tokenizer) -> tau_theta -> context
    class ("class")                   class_ids    -> ClassEmbedder -> one-token context [B, 1, D]
    super-resolution ("concat")       images       low-res RGB in [-1, 1], concatenated with z_t (Sec. 4.4)
    inpainting ("concat")             images+masks masked image encoded by the first stage + mask (Sec. 4.5)
    semantic ("rescaler")             maps         class ids -> one-hot -> SpatialRescaler -> concatenated (Sec. 4.3.2)
    unconditional ("none")            nothing
`condition_pair` turns them into (cond, uncond) for `ldm.diffusion.guidance.classifier_free_guidance`:
dicts {"context": ...} or {"concat": ...}; uncond is the conditioner's empty condition
(`null_condition` for cross-attention, zeros via `null_like` for concat, App. C of Ho & Salimans).

Inpainting follows the released CompVis inpainting model (ldm-vq4-inpainting): pixels to fill are
set to -1 in the image, the masked image is encoded by the first stage without the latent scale
factor (its pre-quantisation / posterior-mean latent), and the mask, mapped to {-1, 1} (1 = fill),
is resized (nearest) to the latent grid; c = [encoded masked image, mask].
"""
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.tokenizers import build_tokenizer
from pipeline.conditions.layouts import tokenizer_of

KIND_INPUTS = {"none": (), "text": ("prompts",), "layout": ("layouts",), "class": ("class_ids",),
               "concat": ("images", "masks"), "rescaler": ("maps",)}
INPUT_KEYS = {"prompts": "prompts / prompt_file", "layouts": "layouts", "class_ids": "class_ids", "images": "images",
              "masks": "masks", "maps": "maps"}


@dataclass
class Conditions:
    """Per-sample conditions; every field that is set has one entry per sample (the seeds' order).

    images: [N, 3, H, W] in [-1, 1] (SR: the low-res input; inpainting: the image to complete).
    masks: [N, 1, H, W] in {0, 1}, 1 = the region to generate (inpainting only, with `images`).
    maps: [N, H, W] integer class ids at image size (semantic synthesis).
    layouts: N lists of ldm.diffusion.layout.Box, image-relative (layout-to-image; the crop is the whole image),
        or N token rows [L] as precompute stored them with their crop (a layout latent folder).
    guide_targets: [N, 3, h, w] in [-1, 1], the images y of image guiding (App. C, Eq. 17), with any model:
        sampling.image_guidance_scale > 0 pulls T(D(z0_hat)) towards them (jobs.sample.generate).
    """
    prompts: list[str] | None = None
    class_ids: list[int] | None = None
    images: Tensor | None = None
    masks: Tensor | None = None
    maps: Tensor | None = None
    layouts: list | None = None
    guide_targets: Tensor | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def num_samples(self) -> int | None:
        sizes = {len(getattr(self, name)) for name in self.given()}
        if len(sizes) > 1:
            raise ValueError(f"conditions {self.given()} have different lengths {sorted(sizes)}: pass one "
                             "entry per sample in each")
        return sizes.pop() if sizes else None

    def select(self, start: int, stop: int) -> "Conditions":
        return Conditions(**{name: getattr(self, name)[start:stop] for name in self.given()})


def conditioner_kind(bundle) -> str:
    return bundle.preset.conditioner.kind


def check_conditions(bundle, conditions: Conditions, num_seeds: int) -> None:
    """ValueError naming what to pass when `conditions` do not fit the model or the seeds."""
    kind, given = conditioner_kind(bundle), [name for name in conditions.given() if name != "guide_targets"]
    expected = KIND_INPUTS[kind]
    wrong = [name for name in given if name not in expected]
    if wrong:
        needs = " or ".join(INPUT_KEYS[name] for name in expected) or "no conditions"
        raise ValueError(f"preset {bundle.preset_name!r} is {_describe(kind)}: it takes {needs}, "
                         f"not {', '.join(INPUT_KEYS[name] for name in wrong)}")
    if kind != "none" and expected[0] not in given:
        raise ValueError(f"preset {bundle.preset_name!r} is {_describe(kind)}: pass {INPUT_KEYS[expected[0]]}")
    count = conditions.num_samples()
    if count is not None and count != num_seeds:
        raise ValueError(f"{count} conditions for {num_seeds} seeds: pass one seed per sample")
    if kind == "class":
        _check_class_ids(conditions.class_ids, bundle.preset.conditioner.num_classes)
    if kind == "concat":
        _check_images(bundle, conditions)
    if kind == "rescaler":
        _check_maps(bundle, conditions.maps)
    if kind == "layout":
        layout_tokens(bundle, conditions.layouts)


def _describe(kind: str) -> str:
    return {"none": "unconditional", "text": "text-conditional", "layout": "layout-conditional (boxes)",
            "class": "class-conditional",
            "concat": "conditioned on an image (super-resolution / inpainting)",
            "rescaler": "conditioned on a segmentation map (semantic synthesis)"}[kind]


def _check_maps(bundle, maps: Tensor) -> None:
    num_classes = bundle.preset.conditioner.rescaler_in_channels
    if maps.ndim != 3 or maps.is_floating_point():
        raise ValueError(f"maps must be [N, H, W] integer class ids, got {tuple(maps.shape)} {maps.dtype}")
    if maps.numel() and not 0 <= int(maps.min()) <= int(maps.max()) < num_classes:
        raise ValueError(f"maps hold class ids {int(maps.min())}..{int(maps.max())}, preset {bundle.preset_name!r} "
                         f"reads {num_classes} classes (0..{num_classes - 1})")


def one_hot_maps(ids_BHW: Tensor, num_classes: int) -> Tensor:
    """[B, num_classes, H, W] float32 one-hot of class ids; an id outside 0..num_classes-1 (-1: guidance
    dropout's empty map) is all zeros. Sampling and training alike."""
    classes = torch.arange(num_classes, device=ids_BHW.device).view(1, -1, 1, 1)
    return (ids_BHW.long()[:, None] == classes).float()


def _check_class_ids(class_ids: list[int], num_classes: int) -> None:
    bad = [c for c in class_ids if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"class_ids {bad[:5]} outside [0, {num_classes}): this model has {num_classes} classes")


def _check_images(bundle, conditions: Conditions) -> None:
    images, masks = conditions.images, conditions.masks
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] RGB in [-1, 1], got {tuple(images.shape)}")
    channels = bundle.preset.conditioner.concat_channels
    if masks is None and channels != 3:
        raise ValueError(f"preset {bundle.preset_name!r} concatenates {channels} channels: an inpainting model "
                         "needs masks as well as images")
    if masks is not None:
        latent_channels = bundle.latent_shape[0]
        if channels != latent_channels + 1:
            raise ValueError(f"preset {bundle.preset_name!r} concatenates {channels} channels, not an inpainting "
                             f"model's {latent_channels} + 1: pass images without masks (super-resolution)")
        if masks.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(f"masks {tuple(masks.shape)} must be [N, 1, H, W] like images {tuple(images.shape)}")


@lru_cache(maxsize=4)
def _cached_tokenizer(kind: str, name_or_path: str | None, max_length: int):
    return build_tokenizer(kind, name_or_path, max_length)  # building one reads its vocabulary: once


def _tokenizer(bundle):
    if bundle.tokenizer is None:
        raise ValueError(f"preset {bundle.preset_name} from {(bundle.source or {}).get('path')} has no tokenizer "
                         "recorded, so prompts cannot become tokens: export it with its training data's manifest "
                         "(which names the tokenizer)")
    spec = bundle.tokenizer
    return _cached_tokenizer(spec["kind"], spec.get("name_or_path"), spec["max_length"])


def layout_tokens(bundle, layouts: list) -> Tensor:
    """[N, L] tokens of box lists in the vocabulary the model was trained with (its manifest's layout tokenizer);
    ValueError naming the layout for a box the tokenizer refuses (outside [0, 1], an unknown category)."""
    spec = bundle.tokenizer
    if spec is None or spec.get("kind") != "layout":
        raise ValueError(f"preset {bundle.preset_name} from {(bundle.source or {}).get('path')} records no layout "
                         f"tokenizer ({spec}), so boxes cannot become tokens: export it with its training data's "
                         "manifest (precompute layout.boxes_key)")
    tokenizer = tokenizer_of(spec)
    rows = []
    for i, boxes in enumerate(layouts):
        if isinstance(boxes, Tensor):  # tokens precompute stored (pipeline.conditions.layouts.read_layout_tokens)
            if boxes.shape != (tokenizer.sequence_length,) or int(boxes.min()) < 0 or int(boxes.max()) >= spec[
                    "num_tokens"]:
                raise ValueError(f"layout {i}: stored tokens of shape {tuple(boxes.shape)} in [{int(boxes.min())}, "
                                 f"{int(boxes.max())}], the model takes {tokenizer.sequence_length} tokens below "
                                 f"{spec['num_tokens']}")
            rows.append(boxes.long())
            continue
        try:
            rows.append(tokenizer.encode(boxes)[0])
        except ValueError as err:
            raise ValueError(f"layout {i}: {err}") from err
    return torch.stack(rows)


def _context_pair(bundle, inputs_B, tau) -> tuple[dict, dict]:
    conditioner = bundle.conditioner
    return ({"context": tau(inputs_B)},
            {"context": conditioner(conditioner.null_condition(inputs_B.shape[0]))})


def inpainting_concat(autoencoder, latent_channels: int, images: Tensor, masks: Tensor) -> Tensor:
    """c = [first-stage latent of the masked image, mask on the latent grid] [B, latent_channels + 1, h, w]
    from images [B, 3, H, W] in [-1, 1] and masks [B, 1, H, W] (1 = fill); sampling and training alike."""
    fill = masks > 0.5
    masked = torch.where(fill, torch.full_like(images, -1.0), images)  # filled pixels black, as CompVis
    encoded = autoencoder.encode_moments(masked)[:, :latent_channels]  # KL: posterior mean; VQ: pre-quantisation
    mask_lat = F.interpolate(fill.float() * 2 - 1, size=tuple(encoded.shape[-2:]), mode="nearest")
    return torch.cat([encoded, mask_lat.to(encoded.dtype)], dim=1)


def _inpainting_concat(bundle, images: Tensor, masks: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    if bundle.autoencoder is None:
        raise ValueError("inpainting encodes the masked image with the first stage, but the model has no "
                         "autoencoder: pass autoencoder=<folder or spec>")
    c = inpainting_concat(bundle.autoencoder, bundle.latent_shape[0], images, masks)
    assert tuple(c.shape[-2:]) == latent_hw, "the image size sets the latent size when inpainting"
    return c


def _concat_pair(bundle, conditions: Conditions, latent_hw: tuple[int, int], device) -> tuple[dict, dict]:
    images = conditions.images.to(device, torch.float32)
    if conditions.masks is not None:
        c = _inpainting_concat(bundle, images, conditions.masks.to(device), latent_hw)
    else:  # Sec. 4.4: the low-res image is on the latent grid (generate.image_size checked it)
        assert tuple(images.shape[-2:]) == tuple(latent_hw), (images.shape, latent_hw)
        c = images
    c = bundle.conditioner(c)
    return {"concat": c}, {"concat": bundle.conditioner.null_like(c)}


def condition_pair(bundle, conditions: Conditions, latent_hw: tuple[int, int],
                   device: torch.device) -> tuple[dict, dict] | None:
    """(cond, uncond) for one batch, on `device`; None for an unconditional model."""
    kind = conditioner_kind(bundle)
    if kind == "none":
        return None
    if kind == "text":
        tokens_BL = _tokenizer(bundle)(conditions.prompts).to(device)
        return _context_pair(bundle, tokens_BL, bundle.conditioner)
    if kind == "layout":
        return _context_pair(bundle, layout_tokens(bundle, conditions.layouts).to(device), bundle.conditioner)
    if kind == "class":
        labels_B = torch.tensor([int(c) for c in conditions.class_ids], dtype=torch.long, device=device)
        return _context_pair(bundle, labels_B, bundle.conditioner)
    if kind == "rescaler":
        return _map_pair(bundle, conditions.maps.to(device), latent_hw)
    return _concat_pair(bundle, conditions, latent_hw, device)


def _map_pair(bundle, maps_BHW: Tensor, latent_hw: tuple[int, int]) -> tuple[dict, dict]:
    """Sec. 4.3.2: the one-hot map through the trained SpatialRescaler; the empty map (no class
    anywhere) gives the unconditional branch, as guidance dropout trained it."""
    one_hot = one_hot_maps(maps_BHW, bundle.preset.conditioner.rescaler_in_channels)
    c = bundle.conditioner(one_hot)
    if tuple(c.shape[-2:]) != tuple(latent_hw):
        raise ValueError(f"maps of {maps_BHW.shape[-2]}x{maps_BHW.shape[-1]} rescale to {c.shape[-2]}x{c.shape[-1]}, "
                         f"the latents are {latent_hw[0]}x{latent_hw[1]}: give maps at the image size")
    return {"concat": c}, {"concat": bundle.conditioner(torch.zeros_like(one_hot))}


def unet_with_conditions(unet):
    """model_c(x_t, t, cond) for classifier-free guidance: concat conditions join z_t's channels,
    a context goes to cross-attention (Eq. 3)."""
    def model_c(x_t_BCHW: Tensor, t_B: Tensor, cond: dict) -> Tensor:
        if "concat" in cond:
            x_t_BCHW = torch.cat([x_t_BCHW, cond["concat"].to(x_t_BCHW.dtype)], dim=1)
        return unet(x_t_BCHW, t_B, cond.get("context"))
    return model_c
