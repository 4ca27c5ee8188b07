"""The demo's image guiding in latent space (App. C, Eq. 17): `python -m jobs.demo --task guiding`.

After the shared stages (generate, ingest, autoencoder) and image_latents (shared with --task sr /
inpainting / semantic), two more, each the project's real job:
  guide_ldm   torchrun -m jobs.train experiment=demo-uncond: an UNCONDITIONAL LDM of the scenes (the
              captions are not read)
  guide_eval  each held-out scene downsampled x4 (anti-aliased bicubic, 8 px) is a guide target;
              `jobs.sample guide_images=` draws one sample per target with L2 image guiding
              (sampling.image_guidance_downsample=4: T of Eq. 17 is the same downsampling), and the
              same seeds unguided; both are scored by PSNR against the held-out scene (32 px) and, after
              the downsampling, against the target itself
The headline check: guided_psnr_to_target > unguided_psnr_to_target (issue 17): an unconditional model
upscales a low-res image through guidance alone, the paper's Fig. 14 use. OUT/report-guiding.md holds
the pictures (target | unguided | guided | scene) and the curves.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.demo import report
from jobs.demo.commands import (
    IMAGE_LATENTS,
    IMAGE_SIZE,
    NUM_RANKS,
    image_latents_stage,
    run_job,
    train_image_task,
    train_stage,
)
from jobs.demo.scenes import scene_for_index
from jobs.demo.stages import Stage, StageFailed
from ldm.diffusion.guidance import downsample
from ldm.image_metrics import psnr

EXPERIMENT = "demo-uncond"
FACTOR = 4             # the targets are the scenes downsampled this much (32 px -> 8 px)
GUIDANCE_SCALE = 4.0   # lambda of -lambda sigma_t grad (1/2 ||y - T(D(z0_hat))||^2); measured on the demo (README)


def folder(s) -> Path:
    return s.out / "guiding"


def train(s, log_path: Path) -> dict:
    return train_image_task(s, "guide_ldm", EXPERIMENT, s.out / IMAGE_LATENTS, folder(s) / "ldm", log_path)


def _signed(files: list[Path]) -> torch.Tensor:
    arrays = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


def _save(x_BCHW: torch.Tensor, files: list[Path]) -> None:
    files[0].parent.mkdir(parents=True, exist_ok=True)
    pixels = ((x_BCHW.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for image, path in zip(pixels, files):
        Image.fromarray(image).save(path)


def guide_targets(s, out: Path) -> tuple[list[Path], list[Path]]:
    """(held-out scenes, their x4 downsampled PNGs in `out`), the first --num-samples in index order."""
    scenes = sorted((s.out / "data" / "held_out").glob("*.jpg"))[:s.num_samples]
    targets = [out / f"{scene.stem}.png" for scene in scenes]
    _save(downsample(_signed(scenes), FACTOR), targets)
    return scenes, targets


def _sample(s, name: str, log_path: Path, **overrides) -> list[Path]:
    samples_dir = folder(s) / "eval" / name
    run_job(f"guide_{name}", "sample", {
        "source": folder(s) / "ldm", "out_dir": samples_dir, "num_per_prompt": 1, "seed": s.seed + 1000,
        "device": "cpu", "grid_max": 0, "progress_bar": False, "sampling.sampler": "ddim",
        "sampling.num_steps": s.sample_steps, "sampling.batch_size": 48, **overrides}, s, log_path, NUM_RANKS)
    samples = sorted(samples_dir.glob("[0-9]*.png"))
    if len(samples) != s.num_samples:
        raise StageFailed("guide_eval", log_path, f"{len(samples)} samples in {samples_dir}, {s.num_samples} expected")
    return samples


def evaluate(s, log_path: Path) -> dict:
    """The same seeds with and without L2 guidance to each target; PSNR to the scene and to the target."""
    scenes, targets = guide_targets(s, folder(s) / "eval" / "targets")
    guided = _sample(s, "guided", log_path, guide_images=targets[0].parent, **{
        "sampling.image_guidance_scale": GUIDANCE_SCALE, "sampling.image_guidance_downsample": FACTOR})
    unguided = _sample(s, "unguided", log_path, num_samples=s.num_samples)
    truth, low = _signed(scenes), _signed(targets)
    out = {"num_images": len(scenes), "guidance_scale": GUIDANCE_SCALE, "downsample": FACTOR,
           "targets_dir": str(targets[0].parent)}
    for name, files in (("guided", guided), ("unguided", unguided)):
        x = _signed(files)
        to_scene, to_low = psnr(x, truth), psnr(downsample(x, FACTOR), low)
        out |= {f"{name}_psnr_to_target": float(to_scene.mean()), f"{name}_psnr_to_target_std": float(to_scene.std()),
                f"{name}_lowres_psnr": float(to_low.mean()), f"{name}_dir": str(files[0].parent)}
    out["bicubic_psnr_to_target"] = float(psnr(torch.nn.functional.interpolate(
        low, scale_factor=FACTOR, mode="bicubic", align_corners=False).clamp(-1, 1), truth).mean())
    return out


def stages(s) -> list[Stage]:
    return [
        image_latents_stage(s),
        train_stage(s, "guide_ldm", EXPERIMENT, lambda log: train(s, log), folder(s) / "ldm"),
        Stage("guide_eval", {"sample_steps": s.sample_steps, "num_samples": s.num_samples, "seed": s.seed,
                             "scale": GUIDANCE_SCALE, "factor": FACTOR}, lambda log: evaluate(s, log),
              lambda r: f"{r['num_images']} held-out scenes from their {IMAGE_SIZE // FACTOR} px image: PSNR guided "
                        f"{r['guided_psnr_to_target']:.2f} / unguided {r['unguided_psnr_to_target']:.2f} dB "
                        f"(bicubic {r['bicubic_psnr_to_target']:.2f})", [folder(s) / "eval"]),
    ]


def check(results: dict) -> dict:
    """Guidance must bring the unconditional model's samples closer to the target (issue 17)."""
    ev = results["guide_eval"]
    found = {"guided_psnr_above_unguided": ev["guided_psnr_to_target"] > ev["unguided_psnr_to_target"]}
    return {**found, "passed": all(found.values())}


def headline(results: dict) -> dict:
    ev = results["guide_eval"]
    keys = ("guided_psnr_to_target", "unguided_psnr_to_target", "guided_psnr_to_target_std",
            "unguided_psnr_to_target_std", "guided_lowres_psnr", "unguided_lowres_psnr", "bicubic_psnr_to_target",
            "guidance_scale", "num_images")
    return {"task": "guiding", **{k: ev[k] for k in keys},
            "autoencoder_psnr": results["autoencoder"]["eval"]["psnr"], "guiding_check": check(results)}


def verdict(result: dict) -> str:
    return (f"guided PSNR {result['guided_psnr_to_target']:.2f} dB > unguided {result['unguided_psnr_to_target']:.2f} "
            f"dB: {'passed' if result['guiding_check']['passed'] else 'NOT MET'}")


# ------------------------------------------------------------------------------------------ report


def _pictures(s, results: dict, plots: Path, rows: int = 8) -> list[str]:
    ev = results["guide_eval"]
    targets = sorted(Path(ev["targets_dir"]).glob("*.png"))[:rows]
    (plots / "targets").mkdir(parents=True, exist_ok=True)
    table = []
    for i, target in enumerate(targets):
        shown = plots / "targets" / target.name  # enlarged to the samples' size (nearest): the table's one size
        Image.open(target).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST).save(shown)
        table.append((scene_for_index(int(target.stem), s.seed).caption,
                      [shown, Path(ev["unguided_dir"]) / f"{i:06d}.png", Path(ev["guided_dir"]) / f"{i:06d}.png",
                       s.out / "data" / "held_out" / f"{target.stem}.jpg"]))
    side = report.side_by_side(table, ["target", "unguided", "guided", "scene"], plots / "guiding_side_by_side.png")
    return ["## Image guiding", "", f"An unconditional LDM sampled from the same seeds (DDIM {s.sample_steps} steps) "
            f"without and with L2 guidance (scale {ev['guidance_scale']}) towards each held-out scene's x{FACTOR} "
            "downsampled image (App. C, Eq. 17).", "", f"![guiding side by side]({report._rel(side, s.out)})", ""]


def _scores(results: dict, result: dict) -> list[str]:
    ev = results["guide_eval"]
    verdict_line = (f"Guided samples are closer to the target than the unguided ones from the same seeds: "
                    f"**{'yes' if result['guiding_check']['passed'] else 'NO'}**.")
    rows = [[f"PSNR to the scene ({IMAGE_SIZE} px, dB)",
             f"{ev['guided_psnr_to_target']:.2f} ± {ev['guided_psnr_to_target_std']:.2f}",
             f"{ev['unguided_psnr_to_target']:.2f} ± {ev['unguided_psnr_to_target_std']:.2f}"],
            [f"PSNR to the target after x{FACTOR} downsampling (dB)", f"{ev['guided_lowres_psnr']:.2f}",
             f"{ev['unguided_lowres_psnr']:.2f}"]]
    return ["## Headline", "", verdict_line, "", f"On {ev['num_images']} held-out scenes; bicubic upsampling of the "
            f"targets reaches {ev['bicubic_psnr_to_target']:.2f} dB.", ""] + \
        report._table(["", "guided", "unguided"], rows)


def write_report(s, results: dict, runner, result: dict) -> Path:
    return report.image_task_report(s, results, runner, "guiding", "image guiding", _scores(results, result),
                                    ("guiding/ldm", "loss", "unconditional LDM: diffusion loss", "loss"),
                                    lambda plots: _pictures(s, results, plots))
