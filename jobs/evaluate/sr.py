"""The x4 super-resolution protocol of Tab. 5: each HR image of `hr_images` is degraded (bicubic or
BSR, seeded by `seed` and its index), the model upsamples the low-res image, and the sample is scored
against the HR image: PSNR and SSIM (mean and std over images, ldm.image_metrics), and FID / IS on
its Inception features like any generated set. The same low-res images upsampled bicubically give
the baseline row (`bicubic_psnr`, `bicubic_ssim`).

Rank r takes the images with index % world_size == r and draws sample i with seed + i, so the
numbers do not depend on the number of ranks.
"""
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.distributed import DistInfo, all_gather_object
from jobs.evaluate.fid import iter_slice, open_source, same_size_batches, to_inception_input, to_pil
from jobs.sample.conditions import Conditions
from jobs.sample.generate import generate, seeds_for
from ldm.image_metrics import psnr, ssim
from pipeline.conditions import condition_rng
from pipeline.conditions.degradations import SCALE, degrade

SCORES = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")
LOW_RES_DIR = "low_res"  # save_images=true: the low-res inputs beside out_dir/samples


def _signed(images_NHW3: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_NHW3).permute(0, 3, 1, 2).float() / 127.5 - 1


def _scores(sr_NHW3: np.ndarray, hr_NHW3: np.ndarray, low_NHW3: np.ndarray) -> list[dict[str, float]]:
    height, width = hr_NHW3.shape[1:3]
    bicubic = np.stack([np.asarray(Image.fromarray(x).resize((width, height), Image.Resampling.BICUBIC))
                        for x in low_NHW3])
    sr, hr, up = _signed(sr_NHW3), _signed(hr_NHW3), _signed(bicubic)
    values = {"psnr": psnr(sr, hr), "ssim": ssim(sr, hr), "bicubic_psnr": psnr(up, hr), "bicubic_ssim": ssim(up, hr)}
    return [{key: float(values[key][i]) for key in SCORES} for i in range(len(hr_NHW3))]


def sr_slice(bundle, cfg, dist_info: DistInfo, scores: list, save_to: tuple[Path, Path] | None = None,
             lpips=None) -> Iterator[tuple[int, torch.Tensor]]:
    """(global index, Inception input) of this rank's SR samples; appends (index, scores) to `scores`.
    save_to=(samples folder, low-res folder): also write each sample and its low-res input as PNG.
    With sampling.image_guidance_scale > 0 each sample is also guided towards its own low-res input
    (App. C: the guiding rows of Tab. 5; `lpips` for image_guidance_loss=lpips)."""
    for folder in save_to or ():
        folder.mkdir(parents=True, exist_ok=True)
    source = open_source(cfg.hr_images)
    hr_images = iter_slice(source, dist_info.rank, dist_info.world_size, None, cfg.num_samples)
    for indices, hr in same_size_batches(hr_images, cfg.sampling.batch_size, f"hr_images={cfg.hr_images!r}"):
        if any(side % SCALE for side in hr[0].shape[:2]):
            raise ValueError(f"hr_images={cfg.hr_images!r}: image {indices[0]} is {hr[0].shape[0]}x{hr[0].shape[1]}, "
                             f"not a multiple of {SCALE}: crop the HR images to multiples of {SCALE}")
        low = np.stack([degrade(x, cfg.degradation, condition_rng(cfg.seed, 0, i)) for i, x in zip(indices, hr)])
        guide = _signed(low) if cfg.sampling.image_guidance_scale > 0 else None
        samples = generate(bundle, Conditions(images=_signed(low), guide_targets=guide), seeds_for(indices, cfg.seed),
                           cfg.sampling, dist_info.device, lpips=lpips).numpy()
        scores.extend(zip(indices, _scores(samples, hr, low)))
        for index, image_HW3, low_HW3 in zip(indices, samples, low):
            if save_to:
                Image.fromarray(image_HW3).save(save_to[0] / f"{index:06d}.png")
                Image.fromarray(low_HW3).save(save_to[1] / f"{index:06d}.png")
            yield index, to_inception_input(to_pil(image_HW3), cfg.resolution)


def summarize(scores: list) -> dict[str, float]:
    """Mean and std over every rank's images (call on every rank: a gather)."""
    merged = sorted((pair for part in all_gather_object(scores) for pair in part), key=lambda pair: pair[0])
    out = {}
    for key in SCORES:
        values = np.array([s[key] for _, s in merged])
        out[key], out[f"{key}_std"] = float(values.mean()), float(values.std())
    return out
