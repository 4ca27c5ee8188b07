"""The demo's inpainting task (Sec. 4.5): `python -m jobs.demo --task inpainting`.

After the shared stages (generate, ingest, autoencoder) and image_latents (shared with --task sr):
  inp_ldm    torchrun -m jobs.train experiment=demo-inpainting: the loader draws a mask per (seed, epoch,
             sample) from LaMa's generators (data.masks=train-32: train-256 shrunk for 32 px), the training
             step encodes the masked image with the frozen autoencoder; L1 loss, as the paper's
  inp_eval   each held-out image gets a square hole over part of its shape (HOLE_SIDE of the shape's
             bounding box, centred at a seeded point inside it); `jobs.sample images= masks=` fills it
             (composited: known pixels kept); scored in the hole against the truth, beside the baseline
             that fills the hole with the mean colour of the visible pixels
The headline check: the model's PSNR in the hole above the baseline's (issue 16). LPIPS needs the VGG16
weights, which the demo does not download: without them both LPIPS figures are null, and the JSON says
why. OUT/report-inpainting.md holds the pictures (masked | inpainted | truth) and the curves.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.demo import report
from jobs.demo.commands import IMAGE_LATENTS, NUM_RANKS, image_latents_stage, run_job, train_image_task, train_stage
from jobs.demo.scenes import scene_for_index
from jobs.demo.stages import Stage, StageFailed

EXPERIMENT = "demo-inpainting"
HOLE_SIDE = 0.75        # side of the square hole / the shorter side of the shape's bounding box
SHAPE_DISTANCE = 60     # a pixel is the shape's when a channel differs this much from the border's colour
_MASK_STREAM = 0x1A_3A  # keeps the holes' random stream apart from the demo's other draws


def folder(s) -> Path:
    return s.out / "inpainting"


def shape_pixels(image_HW3: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels far from the background, whose colour is the median of the image's border."""
    border = np.concatenate([image_HW3[0], image_HW3[-1], image_HW3[:, 0], image_HW3[:, -1]])
    distance = np.abs(image_HW3.astype(np.int16) - np.median(border, axis=0).astype(np.int16)).max(axis=-1)
    return distance > SHAPE_DISTANCE


def hole_over_shape(image_HW3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W] in {0, 1}: a square over part of the shape (HOLE_SIDE of its bounding box's shorter
    side, centred at a uniform point of the box, kept on the canvas)."""
    ys, xs = np.nonzero(shape_pixels(image_HW3))
    if len(ys) == 0:
        raise ValueError("no shape found in the image: the demo's held-out scenes each hold one")
    side = max(3, round(HOLE_SIDE * min(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
    cy, cx = rng.integers(ys.min(), ys.max() + 1), rng.integers(xs.min(), xs.max() + 1)
    height, width = image_HW3.shape[:2]
    top, left = int(np.clip(cy - side // 2, 0, height - side)), int(np.clip(cx - side // 2, 0, width - side))
    mask = np.zeros((height, width), np.uint8)
    mask[top:top + side, left:left + side] = 1
    return mask


def write_masks(s, held_out: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for f in held_out:
        rng = np.random.default_rng([s.seed, int(f.stem), _MASK_STREAM])
        mask = hole_over_shape(np.asarray(Image.open(f).convert("RGB")), rng)
        files.append(out / f"{f.stem}.png")
        Image.fromarray(mask * 255).save(files[-1])
    return files


def psnr_in_hole(x_NHW3: np.ndarray, truth_NHW3: np.ndarray, mask_NHW: np.ndarray) -> np.ndarray:
    """PSNR in dB per image over the hole's pixels only."""
    hole = mask_NHW[..., None].astype(bool)
    error = (x_NHW3.astype(np.float64) - truth_NHW3.astype(np.float64)) ** 2
    mse = (error * hole).sum(axis=(1, 2, 3)) / (3 * hole.sum(axis=(1, 2, 3)))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def mean_colour_fill(image_NHW3: np.ndarray, mask_NHW: np.ndarray) -> np.ndarray:
    """The baseline: each hole filled with the mean colour of its image's visible pixels."""
    visible = ~mask_NHW.astype(bool)
    filled = image_NHW3.copy()
    for i in range(len(filled)):
        filled[i][~visible[i]] = np.round(image_NHW3[i][visible[i]].mean(axis=0)).astype(np.uint8)
    return filled


def lpips_distances(a_NHW3: np.ndarray, b_NHW3: np.ndarray) -> tuple[np.ndarray | None, str]:
    """LPIPS-VGG per image pair, or (None, why) when its VGG16 weights are not on the machine."""
    from pipeline.models.weights import load_lpips

    try:
        lpips = load_lpips(allow_download=False)
    except ValueError as err:
        return None, f"not computed: {err}"
    to = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        return lpips(to(a_NHW3), to(b_NHW3)).flatten().numpy(), "LPIPS-VGG (v0.1 heads)"


def train(s, log_path: Path) -> dict:
    return train_image_task(s, "inp_ldm", EXPERIMENT, s.out / IMAGE_LATENTS, folder(s) / "ldm", log_path)


def evaluate(s, log_path: Path) -> dict:
    held_out = sorted((s.out / "data" / "held_out").glob("*.jpg"))
    masks = write_masks(s, held_out, folder(s) / "eval" / "masks")
    samples_dir = folder(s) / "eval" / "samples"
    run_job("inp_sample", "sample", {
        "source": folder(s) / "ldm", "images": s.out / "data" / "held_out", "masks": masks[0].parent,
        "out_dir": samples_dir, "num_per_prompt": 1, "seed": s.seed + 1000, "device": "cpu", "grid_max": 0,
        "progress_bar": False,
        "sampling.sampler": "ddim", "sampling.num_steps": s.sample_steps, "sampling.guidance_scale": 1.0,
        "sampling.batch_size": 48}, s, log_path, NUM_RANKS)
    samples = [samples_dir / f"{i:06d}.png" for i in range(len(held_out))]
    if missing := [f.name for f in samples if not f.is_file()]:
        raise StageFailed("inp_eval", log_path, f"{len(missing)} samples missing in {samples_dir}, e.g. {missing[0]}")
    truth = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in held_out])
    inpainted = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in samples])
    hole = np.stack([np.asarray(Image.open(f)) > 127 for f in masks]).astype(np.uint8)
    baseline = mean_colour_fill(truth, hole)
    ours, base = psnr_in_hole(inpainted, truth, hole), psnr_in_hole(baseline, truth, hole)
    lpips_ours, lpips_name = lpips_distances(inpainted, truth)
    lpips_base, _ = lpips_distances(baseline, truth)
    on_shape = [float((h.astype(bool) & shape_pixels(t)).sum() / h.sum()) for h, t in zip(hole, truth)]
    return {"inpaint_psnr_hole": float(ours.mean()), "baseline_psnr_hole": float(base.mean()),
            "inpaint_psnr_hole_std": float(ours.std()), "baseline_psnr_hole_std": float(base.std()),
            "inpaint_lpips": None if lpips_ours is None else float(lpips_ours.mean()),
            "baseline_lpips": None if lpips_base is None else float(lpips_base.mean()), "lpips": lpips_name,
            "num_images": len(held_out), "mean_hole_fraction": float(hole.mean()),
            "hole_on_shape_fraction": float(np.mean(on_shape)), "samples_dir": str(samples_dir),
            "masks_dir": str(masks[0].parent)}


def stages(s) -> list[Stage]:
    return [
        image_latents_stage(s),
        train_stage(s, "inp_ldm", EXPERIMENT, lambda log: train(s, log), folder(s) / "ldm"),
        Stage("inp_eval", {"sample_steps": s.sample_steps, "seed": s.seed, "hole_side": HOLE_SIDE},
              lambda log: evaluate(s, log),
              lambda r: f"{r['num_images']} held-out images, holes {r['mean_hole_fraction']:.0%} of the image "
                        f"({r['hole_on_shape_fraction']:.0%} on the shape): PSNR in the hole {r['inpaint_psnr_hole']:.2f}"
                        f" dB / mean-colour fill {r['baseline_psnr_hole']:.2f} dB", [folder(s) / "eval"]),
    ]


def check(results: dict) -> dict:
    """What training must achieve: the hole filled closer to the truth than by the mean visible colour
    (PSNR in the hole), as issue 16 asks. Reported, never relaxed."""
    ev = results["inp_eval"]
    found = {"inpaint_psnr_above_baseline": ev["inpaint_psnr_hole"] > ev["baseline_psnr_hole"]}
    return {**found, "passed": all(found.values())}


def headline(results: dict) -> dict:
    ev = results["inp_eval"]
    keys = ("inpaint_psnr_hole", "baseline_psnr_hole", "inpaint_psnr_hole_std", "baseline_psnr_hole_std",
            "inpaint_lpips", "baseline_lpips", "lpips", "num_images", "mean_hole_fraction", "hole_on_shape_fraction")
    return {"task": "inpainting", **{k: ev[k] for k in keys},
            "autoencoder_psnr": results["autoencoder"]["eval"]["psnr"], "inpainting_check": check(results)}


def verdict(result: dict) -> str:
    return (f"PSNR in the hole {result['inpaint_psnr_hole']:.2f} dB > mean-colour fill "
            f"{result['baseline_psnr_hole']:.2f} dB: "
            f"{'passed' if result['inpainting_check']['passed'] else 'NOT MET (more --train-steps?)'}")


# ------------------------------------------------------------------------------------------ report


def _pictures(s, results: dict, plots: Path, rows: int = 8) -> list[str]:
    ev = results["inp_eval"]
    held_out = sorted((s.out / "data" / "held_out").glob("*.jpg"))[:rows]
    (plots / "masked").mkdir(parents=True, exist_ok=True)
    table = []
    for i, truth in enumerate(held_out):
        image = np.asarray(Image.open(truth).convert("RGB")).copy()
        image[np.asarray(Image.open(Path(ev["masks_dir"]) / f"{truth.stem}.png")) > 127] = 0
        masked = plots / "masked" / f"{truth.stem}.png"
        Image.fromarray(image).save(masked)
        table.append((scene_for_index(int(truth.stem), s.seed).caption,
                      [masked, Path(ev["samples_dir"]) / f"{i:06d}.png", truth]))
    side = report.side_by_side(table, ["masked", "inpainted", "truth"], plots / "inpainting_side_by_side.png")
    return ["## Inpainting", "", f"Held-out images with a square hole over part of the shape (black), filled by "
            f"the LDM (DDIM {s.sample_steps} steps, known pixels kept).", "",
            f"![inpainting side by side]({report._rel(side, s.out)})", ""]


def _scores(results: dict, result: dict) -> list[str]:
    ev = results["inp_eval"]
    verdict_line = (f"The model fills the hole closer to the truth than the mean visible colour (PSNR in the "
                    f"hole): **{'yes' if result['inpainting_check']['passed'] else 'NO'}**.")
    lpips = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [["PSNR in the hole (dB)", f"{ev['inpaint_psnr_hole']:.2f} ± {ev['inpaint_psnr_hole_std']:.2f}",
             f"{ev['baseline_psnr_hole']:.2f} ± {ev['baseline_psnr_hole_std']:.2f}"],
            ["LPIPS (whole image)", lpips(ev["inpaint_lpips"]), lpips(ev["baseline_lpips"])]]
    return ["## Headline", "", verdict_line, "", f"On {ev['num_images']} held-out images; holes cover "
            f"{ev['mean_hole_fraction']:.0%} of an image on average, {ev['hole_on_shape_fraction']:.0%} of each hole "
            f"on the shape. LPIPS: {ev['lpips']}.", ""] + report._table(["", "LDM", "mean-colour fill"], rows)


def write_report(s, results: dict, runner, result: dict) -> Path:
    return report.image_task_report(s, results, runner, "inpainting", "inpainting", _scores(results, result),
                                    ("inpainting/ldm", "loss", "inpainting LDM: L1 diffusion loss", "loss"),
                                    lambda plots: _pictures(s, results, plots))
