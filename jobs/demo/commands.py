"""The work of each demo stage: the project's real jobs, run as the commands a user would type.

Every stage but `generate`, `adherence` and `report` is a subprocess `python -m jobs.<name> key=value ...`
(`torchrun --nproc_per_node=2 -m jobs.train ...` for the LDM), so the demo exercises exactly the entry
points, configs and artifact formats of the real pipeline; jobs/demo/run.py chains them with the stage
runner (jobs/demo/stages.py). Each function takes the demo's settings and the stage's log file and
returns the stage's JSON-able summary.
"""
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.demo.adherence import adherence
from jobs.demo.http_server import LoopbackServer
from jobs.demo.scenes import MAP_CLASSES, scene_for_index, with_base_url, write_demo_dataset
from jobs.demo.stages import Stage, StageFailed, last_json_line, run_logged
from jobs.distributed import free_port
from pipeline.models.autoencoder import load_autoencoder

# Offline by construction: no hub, no W&B, no Ray usage stats or tokens, no albumentations update check.
# One intra-op thread per process, parallelism from 2 ranks (torchrun) or 2 Ray workers: on 2 cores that
# are also busy with anything else, a 2-thread process stalls on its slower thread (measured: the
# autoencoder ran 10x slower as 1 process x 2 threads than as 2 ranks x 1 thread on a loaded machine).
JOB_ENV = {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
NUM_RANKS = 2
IMAGE_SIZE = 32  # 32 px -> 8x8x4 latents through debug-kl (f=4): the latent size of preset demo-t2i
SAMPLE_VARIANTS = ("guided", "unguided", "unconditional")


def job_args(module: str, overrides: dict, hydra_dir: Path) -> list[str]:
    """`-m jobs.<module> key=value ...` with Hydra's own output folder under the demo's."""
    return ["-m", f"jobs.{module}", *(f"{k}={_value(v)}" for k, v in overrides.items()), f"hydra.run.dir={hydra_dir}"]


def _value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def launcher(num_ranks: int) -> list[str]:
    """`python` for one process, `python -m torch.distributed.run --nproc_per_node=N` for N ranks."""
    if num_ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_ranks}",
            f"--master_port={free_port()}"]


def run_job(stage: str, module: str, overrides: dict, s, log_path: Path, num_ranks: int = 1) -> dict:
    """Run a job and return the JSON summary it prints (rank 0's, under torchrun)."""
    command = [*launcher(num_ranks), *job_args(module, overrides, s.out / "hydra" / stage)]
    return last_json_line(run_logged(stage, command, log_path, JOB_ENV), stage, log_path)


# ------------------------------------------------------------------------------------------ data


def generate(s, log_path: Path) -> dict:
    """The captioned scenes (urls.parquet + images/) and a folder of held-out images for FID."""
    info = write_demo_dataset(s.out / "data", s.num_images, seed=s.seed, image_size=IMAGE_SIZE,
                              held_out=s.num_held_out)
    held_out = s.out / "data" / "held_out"
    shutil.rmtree(held_out, ignore_errors=True)
    held_out.mkdir()
    for index in range(s.num_images, s.num_images + s.num_held_out):
        shutil.copyfile(s.out / "data" / "images" / f"{index:06d}.jpg", held_out / f"{index:06d}.jpg")
    log_path.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "held_out_dir": str(held_out)}


def ingest(s, log_path: Path) -> dict:
    """Serve the scenes on 127.0.0.1 and ingest them with `jobs.ingest` (img2dataset on a local Ray),
    each with its segmentation map from data/maps."""
    data = s.out / "data"
    with LoopbackServer(data) as server:
        urls = with_base_url(data / "urls.parquet", server.base_url, data / "urls_served.parquet")
        overrides = {"inputs": [str(urls)], "output_dir": s.out / "shards", "image_size": IMAGE_SIZE,
                     "map_col": "map", "map_dir": data,  # each scene's segmentation map, copied beside it
                     # lossless (img2dataset's quality = PNG compression level): JPEG's chroma rounding shows at 32 px
                     "encode_format": "png", "encode_quality": 3,
                     "part_size": -(-s.num_images // s.num_shards), "thread_count": 16, "ray.num_cpus": 2,
                     "ray.object_store_mb": 256}
        return run_job("ingest", "ingest", overrides, s, log_path)


# ------------------------------------------------------------------------------------------ training


# The LDM draws through the autoencoder's decoder, so its samples can match their captions no more
# often than the autoencoder's reconstructions do. Early in training the decoder merges colours
# (measured: green and blue both drawn as cyan after 600 steps, 4 of 6 colours kept; all 6 after 900),
# and when that happens depends on float rounding, hence on the machine. So the stage checks its
# reconstructions of the held-out images with the adherence detector and trains on (resuming) until
# they keep the captions, up to --ae-max-steps.
RECONSTRUCTION_ADHERENCE_MIN = 0.99  # all four attributes; at most 1 of the 144 held-out images wrong
AE_EXTRA_STEPS = 300


def train_autoencoder(s, log_path: Path) -> dict:
    """The debug KL autoencoder (conf/experiment/ae_demo.yaml) on the image shards, DDP on 2 CPU ranks,
    trained on past its steps while its reconstructions lose caption attributes (see above)."""
    overrides = {"experiment": "ae_demo", "run_dir": s.out / "autoencoder", "data.path": s.out / "shards",
                 "data.resolution": IMAGE_SIZE, "logger.progress_bar": False,
                 # no LPIPS: its VGG16 weights are not shipped and the demo downloads nothing (ae_demo.yaml)
                 "loss.perceptual_weight": 0, "eval.lpips": False, **_steps(s.ae_steps)}
    summary = run_job("autoencoder", "train_autoencoder", overrides, s, log_path, NUM_RANKS)
    checks = [reconstruction_adherence(s, Path(summary["export_dir"]), summary["step"])]
    while checks[-1]["all"] < RECONSTRUCTION_ADHERENCE_MIN and summary["step"] < s.ae_max_steps:
        overrides["trainer.max_steps"] = min(summary["step"] + AE_EXTRA_STEPS, s.ae_max_steps)
        with open(log_path, "a") as log:
            log.write(f"reconstructions at step {summary['step']} keep all four attributes in "
                      f"{checks[-1]['all']:.3f} of held-out images (< {RECONSTRUCTION_ADHERENCE_MIN}): "
                      f"training on to step {overrides['trainer.max_steps']}\n")
        summary = run_job("autoencoder", "train_autoencoder", overrides, s, log_path, NUM_RANKS)  # resumes
        checks.append(reconstruction_adherence(s, Path(summary["export_dir"]), summary["step"]))
    return {**summary, "reconstruction_adherence": checks[-1], "reconstruction_checks": checks,
            **metrics_summary(s.out / "autoencoder" / "metrics.jsonl", "train/loss", "train/img_per_s")}


def reconstruction_adherence(s, export_dir: Path, step: int) -> dict:
    """jobs.demo.adherence of the autoencoder's reconstructions (posterior mean) of the held-out images
    against their own captions: the ceiling of what the LDM's samples can reach."""
    files = sorted((s.out / "data" / "held_out").glob("*.jpg"))
    reconstructions = reconstruct(export_dir, [Image.open(f) for f in files])
    shares = adherence(list(reconstructions), [scene_for_index(int(f.stem), s.seed) for f in files])
    return {"step": step, **shares}


def reconstruct(export_dir: Path, pictures: list) -> np.ndarray:
    """uint8 [N, H, W, 3]: the autoencoder's reconstructions (its posterior mean, KL) of the pictures."""
    model, cfg, _ = load_autoencoder(export_dir)
    images = torch.from_numpy(np.stack([np.asarray(p.convert("RGB")) for p in pictures]))
    with torch.no_grad():
        moments = model.encode_moments(images.permute(0, 3, 1, 2).float() / 127.5 - 1)
        decoded = model.decode(moments[:, :cfg.embed_dim])
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def precompute(s, log_path: Path) -> dict:
    """Latents (KL moments) + caption tokens of every image shard, on a local Ray cluster."""
    overrides = {"input_dir": s.out / "shards", "output_dir": s.out / "latents",
                 "autoencoder": s.out / "autoencoder" / "autoencoder", "resolution": IMAGE_SIZE,
                 "batch_size": 64, "tokenizer.kind": "openclip", "tokenizer.max_length": 16,
                 "ray.num_cpus": 2, "ray.object_store_mb": 256}
    return run_job("latents", "precompute", overrides, s, log_path)


IMAGE_LATENTS = "image_latents"  # OUT/image_latents: latents + each image, for the image-conditioned tasks


def precompute_with_images(s, log_path: Path) -> dict:
    """Latents + each 32 px image (KEY.image.png: SR's HR target, inpainting's image) and its map
    (KEY.seg.png: semantic synthesis' condition) on a local Ray."""
    overrides = {"input_dir": s.out / "shards", "output_dir": s.out / IMAGE_LATENTS,
                 "autoencoder": s.out / "autoencoder" / "autoencoder", "resolution": IMAGE_SIZE,
                 "keep_images": True, "map_classes": len(MAP_CLASSES), "batch_size": 64, "ray.num_cpus": 2,
                 "ray.object_store_mb": 256}
    return run_job(IMAGE_LATENTS, "precompute", overrides, s, log_path)


def image_latents_stage(s) -> Stage:
    return Stage(IMAGE_LATENTS, {"maps": True}, lambda log: precompute_with_images(s, log),
                 lambda r: f"Ray: {r['num_samples_total']} latents + images + maps ({r['samples_per_s']:.0f} img/s) "
                           f"-> {s.out / IMAGE_LATENTS}", [s.out / IMAGE_LATENTS])


def train_image_task(s, stage: str, experiment: str, data_path: Path, run_dir: Path, log_path: Path,
                     extra: dict | None = None) -> dict:
    """A task's LDM on the image latents (`experiment`: demo-sr, demo-inpainting, demo-semantic, demo-uncond,
    demo-class; `extra` overrides) on 2 CPU ranks, its samples decoded by the demo's autoencoder."""
    overrides = {"experiment": experiment, "data.path": data_path, "run_dir": run_dir,
                 "trainer.sample_autoencoder": s.out / "autoencoder" / "autoencoder", "logger.progress_bar": False,
                 "data.seed": s.seed, **_steps(s.train_steps), **(extra or {})}
    run_logged(stage, [*launcher(NUM_RANKS), *job_args("train", overrides, s.out / "hydra" / stage)], log_path, JOB_ENV)
    return {"run_dir": str(run_dir), "world_size": NUM_RANKS,
            **metrics_summary(run_dir / "metrics.jsonl", "loss", "img_per_s")}


def train_stage(s, name: str, experiment: str, train: Callable[[Path], dict], run_dir: Path) -> Stage:
    """The Stage of an image task's LDM: reruns when --train-steps or conf/experiment/EXPERIMENT.yaml change."""
    text = (Path(__file__).parents[2] / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    return Stage(name, {"train_steps": s.train_steps, "experiment": text}, train,
                 lambda r: f"DeepSpeed, 2 ranks: {r['steps']} steps, loss {r['loss_first']:.3f} -> "
                           f"{r['loss_last']:.3f} ({r['img_per_s']:.0f} img/s) -> {r['run_dir']}", [run_dir])


def train_ldm(s, log_path: Path) -> dict:
    """The text-to-image LDM (conf/experiment/demo.yaml) with DeepSpeed on 2 CPU ranks (gloo)."""
    run_dir = s.out / "ldm"
    overrides = {"experiment": "demo", "data.path": s.out / "latents", "run_dir": run_dir,
                 "trainer.sample_autoencoder": s.out / "autoencoder" / "autoencoder", "logger.progress_bar": False,
                 **_steps(s.train_steps)}
    command = [*launcher(NUM_RANKS), *job_args("train", overrides, s.out / "hydra" / "ldm")]
    run_logged("ldm", command, log_path, JOB_ENV)  # jobs.train prints no summary: metrics.jsonl has it
    return {"run_dir": str(run_dir), "world_size": NUM_RANKS,
            **metrics_summary(run_dir / "metrics.jsonl", "loss", "img_per_s")}


def _steps(max_steps: int | None) -> dict:
    """trainer.max_steps when the demo sets it; None keeps the experiment's."""
    return {} if max_steps is None else {"trainer.max_steps": max_steps}


def metrics_summary(path: Path, loss_key: str, rate_key: str) -> dict:
    """Steps, first / last tenth's mean loss and mean throughput of a metrics.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    records = [r for r in records if loss_key in r]
    if not records:
        return {"metrics_file": str(path)}
    losses = [r[loss_key] for r in records]
    tenth = max(1, len(losses) // 10)
    rates = [r[rate_key] for r in records if rate_key in r]
    return {"metrics_file": str(path), "steps": records[-1]["step"], "loss_first": float(np.mean(losses[:tenth])),
            "loss_last": float(np.mean(losses[-tenth:])), "img_per_s": float(np.mean(rates)) if rates else None}


# ------------------------------------------------------------------------------------------ sampling


def sampling_overrides(s, variant: str) -> dict:
    """Guided: CFG scale s on an interval t <= guidance_t_max; unguided: the conditional model (scale 1);
    unconditional: the empty caption (the condition CFG dropout trained), scale 1."""
    scale = s.guidance_scale if variant == "guided" else 1.0
    return {"sampling.sampler": "ddim", "sampling.num_steps": s.sample_steps, "sampling.guidance_scale": scale,
            "sampling.guidance_t_max": s.guidance_t_max if variant == "guided" else None,
            "sampling.clip_x0": s.clip_x0, "sampling.batch_size": 48}


def sample(s, prompts_file: Path, log_path: Path) -> dict:
    """One `jobs.sample` run per variant, one sample per caption, the same seeds in each."""
    summary = {}
    for variant in SAMPLE_VARIANTS:
        out_dir = s.out / "samples" / variant
        shutil.rmtree(out_dir, ignore_errors=True)  # jobs.sample refuses a folder made with other settings
        condition = ({"prompt_file": prompts_file, "num_per_prompt": 1} if variant != "unconditional"
                     else {"prompts": ["''"], "num_per_prompt": s.num_samples})
        overrides = {"source": s.out / "ldm", "out_dir": out_dir, "seed": s.seed + 1000, "device": "cpu",
                     "grid_max": s.num_samples, "progress_bar": False, **condition,
                     **sampling_overrides(s, variant)}
        summary[variant] = run_job(f"sample_{variant}", "sample", overrides, s, log_path, NUM_RANKS)
    return summary


def check_samples(folder: Path, count: int, stage: str, log_path: Path) -> list[Path]:
    files = [folder / f"{i:06d}.png" for i in range(count)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise StageFailed(stage, log_path, f"{len(missing)} samples missing in {folder}, e.g. {missing[0]}")
    return files
