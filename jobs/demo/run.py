"""The embedded demo: the whole pipeline end to end on synthetic captioned scenes, on CPU, in minutes.

    python -m jobs.demo [--task t2i|sr|inpainting|semantic|guiding|class|layout] [--out runs/demo] [--train-steps 2000]
                        [--fresh]

Stages (each the project's real job, run as the command a user would type; jobs/demo/commands.py):
  generate     the captioned scenes (jobs.demo.scenes) and held-out images for FID
  ingest       served on 127.0.0.1, downloaded by img2dataset on a local Ray cluster (jobs.ingest)
  autoencoder  the debug KL autoencoder, f=4 (jobs.train_autoencoder experiment=ae_demo)
  latents      KL moments + caption tokens on Ray (jobs.precompute)
  ldm          the text-to-image LDM with DeepSpeed on 2 CPU ranks (torchrun -m jobs.train experiment=demo)
  sample       one sample per caption: guided (CFG), unguided (scale 1), unconditional (jobs.sample)
  fid          FID / KID of the guided and unguided samples vs the held-out images (jobs.fid_stats, jobs.evaluate)
  adherence    caption adherence of every variant (jobs.demo.adherence)
  report       OUT/report.md with its plots (jobs.demo.report)
--task sr (jobs/demo/tasks/sr.py) runs generate, ingest and autoencoder, then x4 super-resolution:
  image_latents, sr_ldm, sr_eval (PSNR / SSIM against the held-out images, and bicubic's), report-sr.md
--task inpainting (jobs/demo/tasks/inpainting.py): the same, then inp_ldm and inp_eval (PSNR in a hole over
  part of each held-out scene's shape, against a mean-colour fill), report-inpainting.md
--task semantic (jobs/demo/tasks/semantic.py): the same, then sem_ldm and sem_eval (IoU of each sample's shape
  with its held-out scene's map, and with another scene's), report-semantic.md
--task guiding (jobs/demo/tasks/guiding.py): the same, then guide_ldm (an unconditional LDM) and guide_eval (the
  same seeds with and without L2 image guiding to each held-out scene's 8 px image, PSNR to the scene),
  report-guiding.md
--task class (jobs/demo/tasks/classes.py): the same, then class_ldm (the class is the scene's shape) and class_eval
  (the detector reads the shape back from guided and unguided samples), report-class.md
--task layout (jobs/demo/tasks/layout.py): the same, then scenes of 1-3 shapes with boxes through their own
  layout_data, layout_ingest, layout_latents (92 layout tokens each), layout_ldm and layout_eval (the box
  detector scores each sample against its own boxes and another scene's), report-layout.md
The tasks share the first three stages (the image tasks also image_latents): a second task in the
same --out reuses them.
Each prints one line of what it did and how long it took; a failure names the stage and its log
(OUT/logs/STAGE.log). A rerun reuses every finished stage whose settings (and upstream stages) are
unchanged (jobs/demo/stages.py); --fresh redoes everything. The last line of output is one JSON
object of the headline figures.
"""
import argparse
import json
import sys
import time
import typing
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

from jobs.demo import commands, evaluation
from jobs.demo.report import write_report
from jobs.demo.scenes import Scene, scene_for_index
from jobs.demo.stages import Stage, StageFailed, StageRunner
from jobs.demo.tasks import classes, guiding, inpainting, layout, semantic, sr
from pipeline.shards import atomic_write_json

PROMPT_ORDER_SEED = 7  # which scene each sample index asks for (a seeded order of all 144 captions)


@dataclass
class DemoSettings:
    """Everything the demo's outputs depend on; the defaults are the full demo (`make demo`)."""
    out: Path = Path("runs/demo")
    num_images: int = 1152        # training images: 8 of each of the 144 captions
    num_held_out: int = 144       # FID reference images (never trained on)
    num_shards: int = 4           # image shards (the autoencoder holds the last one out for evaluation)
    ae_steps: int | None = None   # None: conf/experiment/ae_demo.yaml's trainer.max_steps (it sets the rest)
    ae_max_steps: int = 1800      # ... trained on up to this while its reconstructions lose captions (commands.py)
    train_steps: int | None = None  # None: conf/experiment/demo.yaml's trainer.max_steps (it sets the rest)
    num_samples: int = 144        # per variant: one per caption
    sample_steps: int = 25        # DDIM
    guidance_scale: float = 3.0
    guidance_t_max: int | None = 600  # guide only for t <= this (DESIGN.md: keeps what high noise set)
    clip_x0: float | None = None  # clamp the predicted latent z_0 at every DDIM step; None: off
    num_calibration: int = 64     # held-out images that set the stand-in Inception's batch-norm statistics
    seed: int = 0

    def __post_init__(self):
        self.out = Path(self.out).resolve()
        if self.num_samples > self.num_held_out or self.num_samples < 2:
            raise ValueError(f"--num-samples {self.num_samples}: between 2 and --num-held-out ({self.num_held_out})")
        if self.ae_steps is not None and self.ae_steps > self.ae_max_steps:
            raise ValueError(f"--ae-steps {self.ae_steps} > --ae-max-steps {self.ae_max_steps}: raise --ae-max-steps")
        if self.num_images < 2 * self.num_shards:
            raise ValueError(f"--num-images {self.num_images}: at least 2 per shard (--num-shards {self.num_shards})")


def prompt_scenes(s: DemoSettings) -> list[Scene]:
    return [scene_for_index(i, PROMPT_ORDER_SEED) for i in range(s.num_samples)]


def _settings(s: DemoSettings, *names: str) -> dict:
    return {name: getattr(s, name) for name in names}


def _experiment(name: str) -> str:
    return (Path(__file__).parents[2] / "conf" / "experiment" / f"{name}.yaml").read_text()


def shared_stages(s: DemoSettings) -> list[Stage]:
    """generate, ingest, autoencoder: the first stages of every task; `config` = the settings each
    one's output depends on."""
    out, data = s.out, ("num_images", "num_held_out", "seed")
    return [
        Stage("generate", _settings(s, *data), lambda log: commands.generate(s, log),
              lambda r: f"{r['num_images']} captioned scenes + {r['num_held_out']} held out, "
                        f"{r['image_size']} px, in {r['out_dir']}", [out / "data"]),
        Stage("ingest", {**_settings(s, "num_shards"), "maps": True}, lambda log: commands.ingest(s, log),
              lambda r: f"img2dataset on Ray: {r['downloaded']} images in {r['shards']} shards "
                        f"({r['images_per_s']:.0f} img/s) -> {out / 'shards'}", [out / "shards"]),
        Stage("autoencoder", {**_settings(s, "ae_steps", "ae_max_steps"), "experiment": _experiment("ae_demo")},
              lambda log: commands.train_autoencoder(s, log),
              lambda r: f"debug-kl {r['step']} steps, held-out PSNR {r['eval']['psnr']:.1f} dB, "
                        f"scale factor {r['eval']['scale_factor']:.3f}, reconstructions keep the caption in "
                        f"{r['reconstruction_adherence']['all']:.3f} -> {r['export_dir']}", [out / "autoencoder"]),
    ]


def t2i_stages(s: DemoSettings, prompts_file: Path) -> list[Stage]:
    """The text-to-image stages after the shared ones."""
    out = s.out
    sampling = ("num_samples", "sample_steps", "guidance_scale", "guidance_t_max", "clip_x0", "seed")
    return [
        Stage("latents", {}, lambda log: commands.precompute(s, log),
              lambda r: f"Ray: {r['num_samples_total']} latents + tokens ({r['samples_per_s']:.0f} img/s) "
                        f"-> {out / 'latents'}", [out / "latents"]),
        Stage("ldm", {**_settings(s, "train_steps"), "experiment": _experiment("demo")},
              lambda log: commands.train_ldm(s, log),
              lambda r: f"DeepSpeed, 2 ranks: {r['steps']} steps, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                        f"({r['img_per_s']:.0f} img/s) -> {r['run_dir']}", [out / "ldm"]),
        Stage("sample", _settings(s, *sampling), lambda log: commands.sample(s, prompts_file, log),
              lambda r: ", ".join(f"{v} {r[v]['num_samples']}" for v in commands.SAMPLE_VARIANTS)
                        + f" samples -> {out / 'samples'}", [out / "samples"]),
        Stage("fid", _settings(s, "num_calibration"), lambda log: evaluation.fid_kid(s, out / "data" / "held_out", log),
              lambda r: f"FID guided {r['guided']['fid']:.1f} / unguided {r['unguided']['fid']:.1f}, KID guided "
                        f"{r['guided']['kid']:.4f} ({'Inception' if r['comparable'] else 'stand-in extractor'})",
              [out / "eval"]),
        Stage("adherence", {}, lambda log: evaluation.caption_adherence(s, prompt_scenes(s), log),
              lambda r: f"all four attributes: guided {r['guided']['all']:.2f}, unguided {r['unguided']['all']:.2f}, "
                        f"unconditional {r['unconditional']['all']:.2f} (chance {r['chance']['all']:.3f})"),
    ]


def adherence_check(adherence: dict) -> dict:
    """What training must achieve: guided samples match their captions more often than
    unguided ones and than chance (all four attributes). Reported, never relaxed."""
    guided, unguided, chance = (adherence[v]["all"] for v in ("guided", "unguided", "chance"))
    check = {"guided_above_unguided": guided > unguided, "guided_above_chance": guided > chance}
    return {**check, "passed": all(check.values())}


def headline(s: DemoSettings, results: dict, runner: StageRunner, report: Path) -> dict:
    adherence, fid = results["adherence"], results["fid"]
    return {
        "caption_adherence_guided": adherence["guided"]["all"],
        "caption_adherence_unguided": adherence["unguided"]["all"],
        "caption_adherence_unconditional": adherence["unconditional"]["all"],
        "caption_adherence_chance": adherence["chance"]["all"],
        "autoencoder_reconstruction_adherence": results["autoencoder"]["reconstruction_adherence"]["all"],
        "autoencoder_steps": results["autoencoder"]["step"],
        "fid": fid["guided"]["fid"], "kid": fid["guided"]["kid"],
        "fid_unguided": fid["unguided"]["fid"], "kid_unguided": fid["unguided"]["kid"],
        "fid_feature_extractor": fid["extractor"], "fid_comparable_to_published": fid["comparable"],
        "adherence_by_attribute": {v: adherence[v] for v in (*commands.SAMPLE_VARIANTS, "chance")},
        "adherence_check": adherence_check(adherence),
        "guidance_scale": s.guidance_scale,
        "stage_seconds": {name: round(runner.elapsed(name), 1) for name in results},
        "stage_cpu_seconds": {name: round(runner.elapsed(name, "cpu_seconds"), 1) for name in results},
        "stages_reused": runner.reused,
        "report": str(report),
    }


def run(s: DemoSettings, reuse: bool = True, task: str = "t2i") -> dict:
    s.out.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(s.out, reuse=reuse)
    results = {stage.name: runner.run(stage) for stage in shared_stages(s)}
    return TASKS[task](s, runner, results)


def run_t2i(s: DemoSettings, runner: StageRunner, results: dict) -> dict:
    prompts_file = s.out / "prompts.txt"
    prompts_file.write_text("".join(scene.caption + "\n" for scene in prompt_scenes(s)))
    results |= {stage.name: runner.run(stage) for stage in t2i_stages(s, prompts_file)}
    check = adherence_check(results["adherence"])
    start = time.perf_counter()
    report = write_report(s.out, s, results, runner, check)
    runner.echo(f"[demo] {'report':<17} {report} ({time.perf_counter() - start:.1f} s)")
    result = headline(s, results, runner, report)
    runner.echo(f"[demo] {'check':<17} guided adherence {result['caption_adherence_guided']:.3f} > unguided "
                f"{result['caption_adherence_unguided']:.3f} and > chance {result['caption_adherence_chance']:.3f}: "
                f"{'passed' if check['passed'] else 'NOT MET (more --train-steps?)'}")
    atomic_write_json(s.out / "metrics.json", result)
    return result


def run_image_task(task, s: DemoSettings, runner: StageRunner, results: dict) -> dict:
    """An image-conditioned task (jobs/demo/tasks/sr.py, inpainting.py, semantic.py): its stages, report and JSON."""
    results |= {stage.name: runner.run(stage) for stage in task.stages(s)}
    result = task.headline(results)
    start = time.perf_counter()
    report = task.write_report(s, results, runner, result)
    runner.echo(f"[demo] {'report':<17} {report} ({time.perf_counter() - start:.1f} s)")
    result |= {"stage_seconds": {name: round(runner.elapsed(name), 1) for name in results},
               "stage_cpu_seconds": {name: round(runner.elapsed(name, "cpu_seconds"), 1) for name in results},
               "stages_reused": runner.reused, "report": str(report)}
    runner.echo(f"[demo] {'check':<17} {task.verdict(result)}")
    atomic_write_json(s.out / f"metrics-{result['task']}.json", result)
    return result


TASKS = {"t2i": run_t2i, "sr": partial(run_image_task, sr), "inpainting": partial(run_image_task, inpainting),
         "semantic": partial(run_image_task, semantic), "guiding": partial(run_image_task, guiding),
         "class": partial(run_image_task, classes), "layout": partial(run_image_task, layout)}


def parse_args(argv=None) -> tuple[DemoSettings, bool, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=list(TASKS), default="t2i", help="which of the paper's tasks (default t2i)")
    for f in fields(DemoSettings):
        kind = next(t for t in (Path, int, float) if t in (f.type, *typing.get_args(f.type)))
        ap.add_argument("--" + f.name.replace("_", "-"), type=_nullable(kind), default=f.default)
    ap.add_argument("--fresh", action="store_true", help="redo every stage (default: reuse finished ones)")
    args = vars(ap.parse_args(argv))
    fresh, task = args.pop("fresh"), args.pop("task")
    return DemoSettings(**args), not fresh, task


def _nullable(kind):
    return lambda text: None if text.lower() in ("none", "null") else kind(text)


def main(argv=None) -> None:
    settings, reuse, task = parse_args(argv)
    try:
        result = run(settings, reuse, task)
    except StageFailed as err:
        print(f"[demo] FAILED: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(result), flush=True)
