"""The demo's class-conditional task (Sec. 4.1, the ImageNet models' setup): `python -m jobs.demo --task class`.

After the shared stages (generate, ingest, autoencoder) and image_latents (shared with the other image
tasks), two more, each the project's real job:
  class_ldm   torchrun -m jobs.train experiment=demo-class: the class is the scene's shape, read by name
              from each sample's metadata (data.label_key=shape) and looked up in classes.txt; label
              dropout to the null class trains the unconditional branch
  class_eval  `jobs.sample class_ids=` draws one sample per held-out scene's class, with classifier-free
              guidance (scale 3) and without (scale 1), the same seeds; the adherence detector reads the
              shape back from each sample
The headline check: class_adherence_guided above both class_adherence_unguided and the chance level 1/3
(issue 17). OUT/report-class.md holds the pictures and the curves.
"""
from pathlib import Path

from PIL import Image

from jobs.demo import report
from jobs.demo.adherence import detect
from jobs.demo.commands import IMAGE_LATENTS, NUM_RANKS, image_latents_stage, run_job, train_image_task, train_stage
from jobs.demo.scenes import SHAPES, scene_for_index
from jobs.demo.stages import Stage, StageFailed

EXPERIMENT = "demo-class"
GUIDANCE_SCALE = 3.0  # the text-to-image demo's (jobs/demo/run.py)
VARIANTS = {"guided": GUIDANCE_SCALE, "unguided": 1.0}


def folder(s) -> Path:
    return s.out / "class"


def train(s, log_path: Path) -> dict:
    classes = folder(s) / "classes.txt"
    classes.parent.mkdir(parents=True, exist_ok=True)
    classes.write_text("\n".join(SHAPES) + "\n")
    return train_image_task(s, "class_ldm", EXPERIMENT, s.out / IMAGE_LATENTS, folder(s) / "ldm", log_path,
                            {"data.classes_file": classes})


def held_out_classes(s) -> list[int]:
    """The class (shape index) of each held-out scene, in index order, the first --num-samples."""
    scenes = sorted((s.out / "data" / "held_out").glob("*.jpg"))[:s.num_samples]
    return [SHAPES.index(scene_for_index(int(f.stem), s.seed).shape) for f in scenes]


def evaluate(s, log_path: Path) -> dict:
    classes = held_out_classes(s)
    out = {"num_images": len(classes), "guidance_scale": GUIDANCE_SCALE, "class_adherence_chance": 1 / len(SHAPES)}
    for variant, scale in VARIANTS.items():
        samples_dir = folder(s) / "eval" / variant
        run_job(f"class_{variant}", "sample", {
            "source": folder(s) / "ldm", "class_ids": classes, "out_dir": samples_dir, "num_per_prompt": 1,
            "seed": s.seed + 1000, "device": "cpu", "grid_max": 0, "progress_bar": False,
            "sampling.sampler": "ddim", "sampling.num_steps": s.sample_steps, "sampling.guidance_scale": scale,
            "sampling.batch_size": 48}, s, log_path, NUM_RANKS)
        samples = [samples_dir / f"{i:06d}.png" for i in range(len(classes))]
        if missing := [f.name for f in samples if not f.is_file()]:
            raise StageFailed("class_eval", log_path, f"{len(missing)} samples missing in {samples_dir}")
        hits = [detect(Image.open(f).convert("RGB"))["shape"] == SHAPES[c] for f, c in zip(samples, classes)]
        out |= {f"class_adherence_{variant}": sum(hits) / len(hits), f"{variant}_dir": str(samples_dir)}
    truth = sorted((s.out / "data" / "held_out").glob("*.jpg"))[:s.num_samples]
    out["class_adherence_scenes"] = sum(detect(Image.open(f).convert("RGB"))["shape"] == SHAPES[c]
                                        for f, c in zip(truth, classes)) / len(classes)
    return out


def stages(s) -> list[Stage]:
    return [
        image_latents_stage(s),
        train_stage(s, "class_ldm", EXPERIMENT, lambda log: train(s, log), folder(s) / "ldm"),
        Stage("class_eval", {"sample_steps": s.sample_steps, "num_samples": s.num_samples, "seed": s.seed,
                             "scale": GUIDANCE_SCALE}, lambda log: evaluate(s, log),
              lambda r: f"{r['num_images']} samples of the held-out scenes' classes: shape right guided "
                        f"{r['class_adherence_guided']:.3f} / unguided {r['class_adherence_unguided']:.3f} "
                        f"(chance {r['class_adherence_chance']:.3f}, the scenes {r['class_adherence_scenes']:.3f})",
              [folder(s) / "eval"]),
    ]


def check(results: dict) -> dict:
    """Guided samples show their class more often than unguided ones and than chance (issue 17)."""
    ev = results["class_eval"]
    found = {"guided_above_unguided": ev["class_adherence_guided"] > ev["class_adherence_unguided"],
             "guided_above_chance": ev["class_adherence_guided"] > ev["class_adherence_chance"]}
    return {**found, "passed": all(found.values())}


def headline(results: dict) -> dict:
    ev = results["class_eval"]
    keys = ("class_adherence_guided", "class_adherence_unguided", "class_adherence_chance", "class_adherence_scenes",
            "guidance_scale", "num_images")
    return {"task": "class", **{k: ev[k] for k in keys},
            "autoencoder_psnr": results["autoencoder"]["eval"]["psnr"], "class_check": check(results)}


def verdict(result: dict) -> str:
    return (f"class adherence guided {result['class_adherence_guided']:.3f} > unguided "
            f"{result['class_adherence_unguided']:.3f} and chance {result['class_adherence_chance']:.3f}: "
            f"{'passed' if result['class_check']['passed'] else 'NOT MET (more --train-steps?)'}")


# ------------------------------------------------------------------------------------------ report


def _pictures(s, results: dict, plots: Path, rows: int = 8) -> list[str]:
    ev = results["class_eval"]
    classes = held_out_classes(s)[:rows]
    table = [(SHAPES[c], [Path(ev["unguided_dir"]) / f"{i:06d}.png", Path(ev["guided_dir"]) / f"{i:06d}.png"])
             for i, c in enumerate(classes)]
    side = report.side_by_side(table, ["unguided", "guided"], plots / "class_side_by_side.png")
    return ["## Class-conditional samples", "", f"One sample per held-out scene's class (its shape), from the same "
            f"seeds without and with classifier-free guidance (scale {ev['guidance_scale']}, DDIM "
            f"{s.sample_steps} steps).", "", f"![class side by side]({report._rel(side, s.out)})", ""]


def _scores(results: dict, result: dict) -> list[str]:
    ev = results["class_eval"]
    verdict_line = (f"Guided samples show their class more often than unguided ones and than chance: "
                    f"**{'yes' if result['class_check']['passed'] else 'NO'}**.")
    rows = [[name, f"{ev[f'class_adherence_{key}']:.3f}"] for name, key in (
        ("guided", "guided"), ("unguided", "unguided"), ("chance", "chance"), ("the held-out scenes", "scenes"))]
    return ["## Headline", "", verdict_line, "", f"Share of {ev['num_images']} samples whose shape the adherence "
            "detector reads as their class.", ""] + report._table(["", "class adherence"], rows)


def write_report(s, results: dict, runner, result: dict) -> Path:
    return report.image_task_report(s, results, runner, "class", "class-conditional", _scores(results, result),
                                    ("class/ldm", "loss", "class-conditional LDM: diffusion loss", "loss"),
                                    lambda plots: _pictures(s, results, plots))
