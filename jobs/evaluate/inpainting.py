"""The inpainting protocol of Tab. 7 (LaMa's): each image of `inpaint_images` gets a mask (drawn by
LaMa's eval rule from `mask_setting`, seeded by `seed` and its index, or read from `masks=`), the
model fills the hole, the output is composited as (1 - m) x + m x_hat, and scored:

- FID (and IS / KID / PR as `metrics` asks) of the composites against the original images of the
  same set (LaMa's evaluator compares predictions with their ground truth, not with a separate
  reference set), over all images and over the images whose hole covers 40-50 % of the picture;
- LPIPS-VGG between each composite and its original (mean and std), over the same two sets.

Rank r takes the images with index % world_size == r and draws sample i with seed + i and its mask
from (seed, i), so the numbers do not depend on the number of ranks.
"""
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.distributed import DistInfo, all_gather_object
from jobs.evaluate.fid import (
    FEATURES_2048,
    ImageSource,
    compute_metrics,
    iter_slice,
    open_source,
    same_size_batches,
    statistics,
    to_inception_input,
    to_pil,
)
from jobs.sample.conditions import Conditions
from jobs.sample.generate import generate, seeds_for
from pipeline.conditions import condition_rng
from pipeline.conditions.masks import BIN_40_50, area_bin, eval_mask

MASKS_DIR = "masks"  # save_images=true: each image's mask beside out_dir/samples
HARD = "40_50"       # the suffix of the 40-50 % bin's metrics


def default_mask_setting(side: int) -> str:
    """LaMa's thick masks at the setting nearest the image size (Tab. 7's rows match thick, inferred)."""
    return "thick-256" if side <= 256 else "thick-512"


def _mask_of(given: tuple[int, torch.Tensor] | None, masks_source: ImageSource | None, index: int,
             name: str, shape: tuple[int, int], setting: str, seed: int) -> np.ndarray:
    """uint8 [H, W] in {0, 1} (1 = hole) of image `index`: the given file's, else drawn."""
    if given is None:
        return eval_mask(setting, *shape, condition_rng(seed, 0, index))
    mask_index, mask_3HW = given
    assert mask_index == index, "masks= and inpaint_images= are read in the same order"
    if tuple(mask_3HW.shape[1:]) != shape:
        raise ValueError(f"masks={str(masks_source.path)!r}: {masks_source.files[index].name} is "
                         f"{mask_3HW.shape[1]}x{mask_3HW.shape[2]} but its image {name} is {shape[0]}x{shape[1]}: "
                         "give each image a mask of its own size (masks= matches files in sorted order)")
    return (mask_3HW[0].numpy() > 127).astype(np.uint8)


def _image_name(source: ImageSource, index: int) -> str:
    return source.files[index].name if source.kind == "images" else f"image {index} of the shards"


def _signed(images_NHW3: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_NHW3).permute(0, 3, 1, 2).float() / 127.5 - 1


def inpainting_slice(bundle, cfg, dist_info: DistInfo, lpips, scores: list,
                     save_to: tuple[Path, Path] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(global index, Inception input) of this rank's composites; appends (index, {"hole_fraction",
    "bin", "lpips"}) to `scores`. save_to=(samples folder, masks folder): also write each composite
    and its mask (white = filled) as PNG."""
    for folder in save_to or ():
        folder.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.inpaint_images)
    images = iter_slice(source, dist_info.rank, dist_info.world_size, None, cfg.num_samples)
    masks_source = open_source(cfg.masks) if cfg.masks is not None else None
    if masks_source is not None and len(masks_source.files) < len(source.files):
        raise ValueError(f"masks={cfg.masks!r} holds {len(masks_source.files)} files for {len(source.files)} "
                         f"inpaint_images: give one mask per image (matched in sorted order)")
    given = iter_slice(masks_source, dist_info.rank, dist_info.world_size) if masks_source else None
    for indices, truth in same_size_batches(images, cfg.sampling.batch_size, f"inpaint_images={cfg.inpaint_images!r}"):
        shape = truth[0].shape[:2]
        setting = cfg.mask_setting or default_mask_setting(max(shape))
        masks = np.stack([_mask_of(next(given) if given else None, masks_source, i, _image_name(source, i), shape,
                                   setting, cfg.seed) for i in indices])
        truth_signed = _signed(truth)
        masks_N1HW = torch.from_numpy(masks).float()[:, None]
        out = generate(bundle, Conditions(images=truth_signed, masks=masks_N1HW), seeds_for(indices, cfg.seed),
                       cfg.sampling, dist_info.device).numpy()
        distances = lpips(_signed(out), truth_signed).tolist() if lpips is not None else [None] * len(indices)
        for index, mask, distance in zip(indices, masks, distances):
            scores.append((index, {"hole_fraction": float(mask.mean()), "bin": area_bin(mask), "lpips": distance}))
        for index, image_HW3, mask in zip(indices, out, masks):
            if save_to:
                Image.fromarray(image_HW3).save(save_to[0] / f"{index:06d}.png")
                Image.fromarray(mask * 255).save(save_to[1] / f"{index:06d}.png")
            yield index, to_inception_input(to_pil(image_HW3), cfg.resolution)


def truth_slice(cfg, dist_info: DistInfo) -> Iterator[tuple[int, torch.Tensor]]:
    """(global index, Inception input) of this rank's original images: the FID reference."""
    source = open_source(cfg.inpaint_images)
    return iter_slice(source, dist_info.rank, dist_info.world_size, cfg.resolution, cfg.num_samples)


def _subset(features: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: tensor[keep] for name, tensor in features.items()}


def _as_reference(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {FEATURES_2048: features[FEATURES_2048], **statistics(features[FEATURES_2048])}


def inpainting_metrics(generated: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], scores: list,
                       metrics_cfg) -> dict[str, float]:
    """Tab. 7's numbers from every rank's gathered features and scores (call on every rank: a gather).

    All images: `metrics_cfg`'s metrics plus lpips / lpips_std / mean_hole_fraction. The 40-50 % bin:
    frechet_inception_distance_40_50, lpips_40_50(_std) and num_samples_40_50 (FID needs 2 images
    in the bin; with fewer it is left out)."""
    merged = sorted((pair for part in all_gather_object(scores) for pair in part), key=lambda pair: pair[0])
    indices = torch.tensor([index for index, _ in merged], dtype=torch.int64)
    assert torch.equal(indices, generated["index"]) and torch.equal(indices, truth["index"]), \
        "every composite has its original and its scores"
    out = compute_metrics(generated, _as_reference(truth), metrics_cfg)
    hard = torch.tensor([s["bin"] == BIN_40_50 for _, s in merged])
    out["mean_hole_fraction"] = float(np.mean([s["hole_fraction"] for _, s in merged]))
    out[f"num_samples_{HARD}"] = int(hard.sum())
    distances = np.array([s["lpips"] for _, s in merged], dtype=float)
    if not np.isnan(distances).any():
        out["lpips"], out["lpips_std"] = float(distances.mean()), float(distances.std())
        if hard.any():
            out[f"lpips_{HARD}"] = float(distances[hard.numpy()].mean())
            out[f"lpips_{HARD}_std"] = float(distances[hard.numpy()].std())
    if metrics_cfg.fid and hard.sum() >= 2:
        fid_only = dataclasses.replace(metrics_cfg, isc=False, kid=False, prc=False)
        hard_fid = compute_metrics(_subset(generated, hard), _as_reference(_subset(truth, hard)), fid_only)
        out[f"frechet_inception_distance_{HARD}"] = hard_fid["frechet_inception_distance"]
    return out
