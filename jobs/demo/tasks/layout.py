"""The demo's layout-to-image task (Sec. 4.3.1, App. E.2.1): `python -m jobs.demo --task layout`.

After the shared stages (generate, ingest, autoencoder; the autoencoder is the one trained on the one-shape
scenes), its own data through the same real jobs a COCO / OpenImages set takes:
  layout_data     scenes of one to three shapes (jobs.demo.layout_scenes) and a URL list whose `boxes` column
                  holds each scene's boxes as jobs.url_list writes them; held-out layouts as JSON lines
  layout_ingest   served on 127.0.0.1 and ingested by jobs.ingest (resize_mode=keep_ratio: the boxes are
                  relative to the whole picture), the boxes carried into each sample's KEY.json
  layout_latents  jobs.precompute layout.boxes_key=boxes: each crop's 92 layout tokens beside its latent
  layout_ldm      torchrun -m jobs.train experiment=demo-layout: the transformer trained jointly with the UNet
  layout_eval     `jobs.sample layouts=` draws one sample per held-out layout (classifier-free guidance, scale
                  3); the box detector scores each sample against its own boxes and against another scene's
The headline check: layout_adherence >= layout_adherence_shuffled + 0.3 (issue 17). OUT/report-layout.md holds
the pictures and the curves.
"""
import json
from pathlib import Path

from PIL import Image, ImageDraw

from jobs.demo import report
from jobs.demo.commands import IMAGE_SIZE, NUM_RANKS, reconstruct, run_job, train_image_task, train_stage
from jobs.demo.http_server import LoopbackServer
from jobs.demo.layout_scenes import box_adherence, read_layouts, write_layout_dataset
from jobs.demo.scenes import SHAPES, with_base_url
from jobs.demo.stages import Stage, StageFailed

EXPERIMENT = "demo-layout"
GUIDANCE_SCALE = 3.0  # the other demo models' (jobs/demo/run.py, tasks/classes.py)
ADHERENCE_MARGIN = 0.3  # layout_adherence must exceed layout_adherence_shuffled by this much (issue 17)
NUM_TOKENS = 257        # preset demo-layout's vocabulary: a 16x16 coordinate grid


def folder(s) -> Path:
    return s.out / "layout"


def generate(s, log_path: Path) -> dict:
    info = write_layout_dataset(folder(s) / "data", s.num_images, s.seed, IMAGE_SIZE, s.num_held_out)
    log_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def ingest(s, log_path: Path) -> dict:
    data = folder(s) / "data"
    with LoopbackServer(data) as server:
        urls = with_base_url(data / "urls.parquet", server.base_url, data / "urls_served.parquet")
        overrides = {"inputs": [str(urls)], "output_dir": folder(s) / "shards", "image_size": IMAGE_SIZE,
                     "resize_mode": "keep_ratio", "encode_format": "png", "encode_quality": 3,
                     "part_size": -(-s.num_images // s.num_shards), "thread_count": 16, "ray.num_cpus": 2,
                     "ray.object_store_mb": 256}
        return run_job("layout_ingest", "ingest", overrides, s, log_path)


def precompute(s, log_path: Path) -> dict:
    overrides = {"input_dir": folder(s) / "shards", "output_dir": folder(s) / "latents",
                 "autoencoder": s.out / "autoencoder" / "autoencoder", "resolution": IMAGE_SIZE, "crop": "center",
                 "layout.boxes_key": "boxes", "layout.num_classes": len(SHAPES), "layout.num_tokens": NUM_TOKENS,
                 "batch_size": 64, "ray.num_cpus": 2, "ray.object_store_mb": 256}
    return run_job("layout_latents", "precompute", overrides, s, log_path)


def held_out(s) -> tuple[Path, list[list[dict]], list[Path]]:
    """(a JSON-lines file of the first --num-samples held-out layouts, those layouts, their scenes' images)."""
    data = folder(s) / "data"
    layouts = read_layouts(data / "held_out.jsonl")[:s.num_samples]
    path = folder(s) / "eval" / "layouts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(boxes) + "\n" for boxes in layouts))
    images = [data / "images" / f"{s.num_images + i:06d}.jpg" for i in range(len(layouts))]
    return path, layouts, images


def evaluate(s, log_path: Path) -> dict:
    path, layouts, scenes = held_out(s)
    samples_dir = folder(s) / "eval" / "samples"
    run_job("layout_sample", "sample", {
        "source": folder(s) / "ldm", "layouts": path, "out_dir": samples_dir, "num_per_prompt": 1,
        "seed": s.seed + 1000, "device": "cpu", "grid_max": 0, "progress_bar": False, "sampling.sampler": "ddim",
        "sampling.num_steps": s.sample_steps, "sampling.guidance_scale": GUIDANCE_SCALE, "sampling.batch_size": 48},
        s, log_path, NUM_RANKS)
    files = [samples_dir / f"{i:06d}.png" for i in range(len(layouts))]
    if missing := [f.name for f in files if not f.is_file()]:
        raise StageFailed("layout_eval", log_path, f"{len(missing)} samples missing in {samples_dir}, e.g. {missing[0]}")
    samples = [Image.open(f).convert("RGB") for f in files]
    pictures = [Image.open(f).convert("RGB") for f in scenes]
    return {"layout_adherence": box_adherence(samples, layouts),
            "layout_adherence_shuffled": box_adherence(samples, layouts[1:] + layouts[:1]),
            "layout_adherence_scenes": box_adherence(pictures, layouts),
            # the LDM draws through this decoder: its reconstructions are about as far as samples can follow boxes
            "layout_adherence_reconstructions": box_adherence(
                list(reconstruct(s.out / "autoencoder" / "autoencoder", pictures)), layouts),
            "num_images": len(layouts), "num_boxes": sum(map(len, layouts)), "guidance_scale": GUIDANCE_SCALE,
            "samples_dir": str(samples_dir), "layouts": str(path)}


def stages(s) -> list[Stage]:
    data = {"num_images": s.num_images, "num_held_out": s.num_held_out, "seed": s.seed}
    return [
        Stage("layout_data", data, lambda log: generate(s, log),
              lambda r: f"{r['num_images']} scenes of 1-3 shapes ({r['num_boxes']} boxes with the held-out ones) + "
                        f"{r['num_held_out']} held out, in {r['out_dir']}", [folder(s) / "data"]),
        Stage("layout_ingest", {"num_shards": s.num_shards}, lambda log: ingest(s, log),
              lambda r: f"img2dataset on Ray: {r['downloaded']} images in {r['shards']} shards, boxes in KEY.json "
                        f"-> {folder(s) / 'shards'}",
              [folder(s) / "shards"]),
        Stage("layout_latents", {}, lambda log: precompute(s, log),
              lambda r: f"Ray: {r['num_samples_total']} latents + 92 layout tokens each ({r['samples_per_s']:.0f} img/s) "
                        f"-> {folder(s) / 'latents'}", [folder(s) / "latents"]),
        train_stage(s, "layout_ldm", EXPERIMENT, lambda log: train_image_task(
            s, "layout_ldm", EXPERIMENT, folder(s) / "latents", folder(s) / "ldm", log), folder(s) / "ldm"),
        Stage("layout_eval", {"sample_steps": s.sample_steps, "num_samples": s.num_samples, "seed": s.seed,
                              "scale": GUIDANCE_SCALE}, lambda log: evaluate(s, log),
              lambda r: f"{r['num_images']} samples of held-out layouts ({r['num_boxes']} boxes): found "
                        f"{r['layout_adherence']:.3f}, against another scene's boxes {r['layout_adherence_shuffled']:.3f} "
                        f"(the scenes {r['layout_adherence_scenes']:.3f}, their reconstructions "
                        f"{r['layout_adherence_reconstructions']:.3f})", [folder(s) / "eval"]),
    ]


def check(results: dict) -> dict:
    """Samples put the shapes where their boxes say, by ADHERENCE_MARGIN over other scenes' boxes (issue 17)."""
    ev = results["layout_eval"]
    found = {"layout_adherence_above_shuffled":
             ev["layout_adherence"] >= ev["layout_adherence_shuffled"] + ADHERENCE_MARGIN}
    return {**found, "passed": all(found.values())}


def headline(results: dict) -> dict:
    ev = results["layout_eval"]
    keys = ("layout_adherence", "layout_adherence_shuffled", "layout_adherence_scenes",
            "layout_adherence_reconstructions", "num_images", "num_boxes", "guidance_scale")
    return {"task": "layout", **{k: ev[k] for k in keys},
            "autoencoder_psnr": results["autoencoder"]["eval"]["psnr"], "layout_check": check(results)}


def verdict(result: dict) -> str:
    return (f"layout adherence {result['layout_adherence']:.3f} >= shuffled {result['layout_adherence_shuffled']:.3f}"
            f" + {ADHERENCE_MARGIN}: {'passed' if result['layout_check']['passed'] else 'NOT MET (more --train-steps?)'}")


# ------------------------------------------------------------------------------------------ report

BOX_COLOURS = {0: (220, 30, 30), 1: (30, 30, 220), 2: (20, 150, 20)}  # circle, square, triangle outlines


def draw_boxes(boxes: list[dict], size: int, out: Path) -> Path:
    """The layout as a picture: each box outlined in its class's colour on white."""
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    for box in boxes:
        x0, y0, w, h = (v * size for v in box["bbox"])
        pen.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], outline=BOX_COLOURS[box["category"]])
    canvas.save(out)
    return out


def _pictures(s, results: dict, plots: Path, rows: int = 8) -> list[str]:
    ev = results["layout_eval"]
    _, layouts, scenes = held_out(s)
    (plots / "layouts").mkdir(parents=True, exist_ok=True)
    table = [(", ".join(SHAPES[b["category"]] for b in boxes),
              [draw_boxes(boxes, IMAGE_SIZE, plots / "layouts" / f"{i:06d}.png"),
               Path(ev["samples_dir"]) / f"{i:06d}.png", scenes[i]]) for i, boxes in enumerate(layouts[:rows])]
    side = report.side_by_side(table, ["layout", "sample", "scene"], plots / "layout_side_by_side.png")
    return ["## Layout-to-image", "", "Held-out layouts (box outlines: red circle, blue square, green triangle), the "
            f"LDM's sample from each (guidance {ev['guidance_scale']}, DDIM {s.sample_steps} steps) and the scene the "
            "boxes came from; the boxes say where and which shape, not its colour.", "",
            f"![layout side by side]({report._rel(side, s.out)})", ""]


def _scores(results: dict, result: dict) -> list[str]:
    ev = results["layout_eval"]
    verdict_line = (f"Samples put their shapes in their own boxes (at least {ADHERENCE_MARGIN} more often than in "
                    f"another scene's): **{'yes' if result['layout_check']['passed'] else 'NO'}**.")
    rows = [["the sample's own layout", f"{ev['layout_adherence']:.3f}"],
            ["another scene's layout", f"{ev['layout_adherence_shuffled']:.3f}"],
            ["the held-out scenes themselves", f"{ev['layout_adherence_scenes']:.3f}"],
            ["the autoencoder's reconstructions of them", f"{ev['layout_adherence_reconstructions']:.3f}"]]
    return ["## Headline", "", verdict_line, "", f"Share of the {ev['num_boxes']} boxes of {ev['num_images']} held-out "
            "layouts in which the detector (jobs/demo/layout_scenes.py) finds a shape of the box's class with IoU >= "
            "0.5.", ""] + report._table(["", "layout adherence"], rows)


def write_report(s, results: dict, runner, result: dict) -> Path:
    return report.image_task_report(s, results, runner, "layout", "layout-to-image", _scores(results, result),
                                    ("layout/ldm", "loss", "layout LDM: L1 diffusion loss", "loss"),
                                    lambda plots: _pictures(s, results, plots))
