"""`python -m jobs.evaluate`: FID / IS / KID / precision-recall of a trained model (the paper's Tab. 1-7).

    python -m jobs.evaluate source=runs/t2i reference_stats=refs/coco256.stats prompt_file=prompts.txt \\
        num_samples=10000 sampling.num_steps=50 sampling.guidance_scale=1.5 out_dir=runs/t2i/eval
    torchrun --nproc_per_node=8 -m jobs.evaluate source=exports/t2i ...   # every rank its slice
    python -m jobs.evaluate images=samples/x reference_stats=refs/x.stats  # a folder, no generation
    python -m jobs.evaluate -m sampling.guidance_scale=1,3,5 source=... # a sweep: one folder per point

Generation: sample i (i < num_samples) gets prompt line i % count of prompt_file (text models),
class_ids[i % count] (class models; default every class in turn), layout i % count of `layouts` (layout
models) and seed `seed + i`; rank r makes the samples i with i % world_size == r (jobs.sample.generate,
deterministic by global index), so the sample set and the numbers do not depend on the number of ranks. Each rank extracts Inception
features of its samples; all ranks gather them; rank 0 computes the metrics against the reference
statistics (jobs.fid_stats) and writes `out_dir/metrics.json` (metrics, protocol, sampling
settings, source) and logs them to metrics.jsonl and W&B (`logger=offline` by default).

In a multirun each point writes to Hydra's sweep folder (runs/eval/DATE/N, N = the point's number),
unless out_dir is set per point (e.g. out_dir=runs/eval/gs\\${sampling.guidance_scale}).
"""
import atexit
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from PIL import Image

from jobs.config import hydra_main
from jobs.distributed import (
    DistInfo,
    broadcast_object,
    cleanup,
    init_distributed,
    print0,
)
from jobs.evaluate import inpainting, sr
from jobs.evaluate.config import EvaluateConfig
from jobs.evaluate.fid import (
    PROTOCOL_KEYS,
    compute_metrics,
    iter_slice,
    kid_subset_size,
    load_stats,
    mismatched_keys,
    open_source,
    read_protocol,
    resize_method,
    to_inception_input,
    to_pil,
)
from jobs.evaluate.inception import FEATURES_2048
from jobs.fid_stats import gathered_features, load_extractor
from jobs.metrics import Metrics
from jobs.sample.conditions import Conditions
from jobs.sample.config import SampleConfig
from jobs.sample.generate import generate, seeds_for
from jobs.sample.run import build_plan, check_layouts, check_maps
from pipeline.models.bundle import LDMBundle, load_ldm
from pipeline.models.weights import load_lpips_or_explain
from pipeline.shards import atomic_write_json

METRICS_JSON = "metrics.json"
SAMPLES_DIR = "samples"


def read_prompts(prompt_file: str | None) -> list[str]:
    if prompt_file is None:
        raise ValueError("the model is text-conditional: set prompt_file=F (one prompt per line)")
    if not Path(prompt_file).is_file():
        raise ValueError(f"prompt_file={prompt_file!r} is not a file")
    prompts = [line.strip() for line in Path(prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt_file={prompt_file!r} holds no prompts")
    return prompts


FOLDER_CONDITIONS = {
    "rescaler": ("maps", "a semantic-synthesis model: set maps=FOLDER (PNG class-id maps; sample i gets map i % count)",
                 check_maps),
    "layout": ("layouts", "a layout-to-image model: set layouts=<a layout latent folder (Tab. 9: the centre-cropped "
               "validation latents) or a JSON-lines file of boxes>", check_layouts),
}


def condition_rule(bundle: LDMBundle, cfg: EvaluateConfig) -> Callable[[list[int]], Conditions]:
    """Global sample indices -> their Conditions (prompts / classes cycle, so any index has one)."""
    kind = bundle.preset.conditioner.kind
    if cfg.prompt_file is not None and kind != "text":
        raise ValueError(f"preset {bundle.preset_name!r} is not text-conditional: drop prompt_file")
    if cfg.class_ids is not None and kind != "class":
        raise ValueError(f"preset {bundle.preset_name!r} is not class-conditional: drop class_ids")
    if cfg.maps is not None and kind != "rescaler":
        raise ValueError(f"preset {bundle.preset_name!r} is not a semantic-synthesis model: drop maps")
    if cfg.layouts is not None and kind != "layout":
        raise ValueError(f"preset {bundle.preset_name!r} is not a layout-to-image model: drop layouts")
    if kind == "text":
        prompts = read_prompts(cfg.prompt_file)
        return lambda indices: Conditions(prompts=[prompts[i % len(prompts)] for i in indices])
    if kind == "class":
        class_ids = list(cfg.class_ids or range(bundle.preset.conditioner.num_classes))
        return lambda indices: Conditions(class_ids=[class_ids[i % len(class_ids)] for i in indices])
    if kind == "none":
        return lambda indices: Conditions()
    if kind in FOLDER_CONDITIONS:  # sample i gets condition i % count of a folder or file, as jobs.sample reads it
        key, missing, check = FOLDER_CONDITIONS[kind]
        if getattr(cfg, key) is None:
            raise ValueError(f"preset {bundle.preset_name!r} is {missing}")
        plan = build_plan(SampleConfig(source=cfg.source, out_dir="", num_per_prompt=1, **{key: getattr(cfg, key)}))
        check(bundle, plan)
        return lambda indices: plan.conditions([i % plan.total for i in indices])
    raise ValueError(f"preset {bundle.preset_name!r} is conditioned on images ({kind}): for super-resolution set "
                     "hr_images=FOLDER (the Tab. 5 protocol), for inpainting inpaint_images=FOLDER (Tab. 7), else "
                     "evaluate its samples with images=FOLDER")


def generated_slice(bundle: LDMBundle, cfg: EvaluateConfig, dist_info: DistInfo,
                    out_dir: Path) -> Iterator[tuple[int, torch.Tensor]]:
    """(global index, uint8 [3, H, W]) of this rank's samples, generated a sampling batch at a time."""
    conditions_of = condition_rule(bundle, cfg)
    indices = list(range(dist_info.rank, cfg.num_samples, dist_info.world_size))
    if cfg.save_images:
        (out_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    step = cfg.sampling.batch_size
    for start in range(0, len(indices), step):
        chunk = indices[start:start + step]
        images_NHW3 = generate(bundle, conditions_of(chunk), seeds_for(chunk, cfg.seed), cfg.sampling,
                               dist_info.device)
        for index, image_HW3 in zip(chunk, images_NHW3.numpy()):
            if cfg.save_images:
                Image.fromarray(image_HW3).save(out_dir / SAMPLES_DIR / f"{index:06d}.png")
            yield index, to_inception_input(to_pil(image_HW3), cfg.resolution)


def check_reference(reference_stats: str, ours: dict) -> dict:
    """The reference's protocol; ValueError if its features were made another way than ours."""
    found = read_protocol(reference_stats)
    if found is None:
        raise ValueError(f"reference_stats={reference_stats!r} is not a stats folder: make it with "
                         f"`python -m jobs.fid_stats reference=IMAGES out={reference_stats}`")
    differing = mismatched_keys(found, ours, PROTOCOL_KEYS)
    if differing:
        details = "; ".join(f"{key}: {found.get(key)!r} there, {ours.get(key)!r} here" for key in differing)
        raise ValueError(f"reference_stats={reference_stats} were made another way ({details}): set "
                         f"resolution= / inception.weights_path= to match, or recompute them with jobs.fid_stats")
    return found


def _record(cfg: EvaluateConfig, metrics: dict, ours: dict, reference: dict, source: dict,
            num_samples: int, seconds: float) -> dict:
    return {"metrics": metrics, "num_samples": num_samples,
            "protocol": {**ours, "kid_subset_size": kid_subset_size(cfg.metrics, num_samples, reference["num_samples"]),
                         "metrics_config": dataclasses.asdict(cfg.metrics)},
            "reference": {"path": reference["path"], "num_samples": reference["num_samples"],
                          "source": reference["source"]},
            "source": source, "sampling": dataclasses.asdict(cfg.sampling) if cfg.source else None,
            "seed": cfg.seed, "prompt_file": cfg.prompt_file, "class_ids": cfg.class_ids,
            "maps": str(Path(cfg.maps).resolve()) if cfg.maps else None,
            "layouts": str(Path(cfg.layouts).resolve()) if cfg.layouts else None,
            "super_resolution": {"hr_images": str(Path(cfg.hr_images).resolve()), "degradation": cfg.degradation,
                                 "scale": sr.SCALE} if cfg.hr_images else None,
            "inpainting": {"images": str(Path(cfg.inpaint_images).resolve()),
                           "masks": str(Path(cfg.masks).resolve()) if cfg.masks else None,
                           "mask_setting": None if cfg.masks else cfg.mask_setting or "thick at the image size",
                           "lpips": "LPIPS-VGG v0.1" if cfg.lpips else None} if cfg.inpaint_images else None,
            "seconds": round(seconds, 2)}


def _log(cfg: EvaluateConfig, out_dir: Path, metrics: dict, step: int) -> None:
    logger = Metrics(dataclasses.replace(cfg.logger, progress_bar=False), out_dir, config=dataclasses.asdict(cfg),
                     is_main=True, total_steps=step)
    logger.log(step, {f"eval/{name}": value for name, value in metrics.items()})
    logger.close()


def output_dir(cfg: EvaluateConfig) -> Path:
    """out_dir, else Hydra's folder of this run or sweep point (rank 0's: each rank names its own)."""
    if cfg.out_dir is None and not HydraConfig.initialized():
        raise ValueError("set out_dir=FOLDER (outside a Hydra app there is no run folder to default to)")
    return Path(broadcast_object(cfg.out_dir or HydraConfig.get().runtime.output_dir))


def _evaluate(cfg: EvaluateConfig, dist_info: DistInfo) -> dict | None:
    out_dir = output_dir(cfg)
    if (out_dir / METRICS_JSON).exists() and not cfg.overwrite:
        raise ValueError(f"{out_dir / METRICS_JSON} exists: set overwrite=true, or another out_dir")
    extractor, identity = load_extractor(cfg.inception, dist_info)
    ours = {**identity, "resize": resize_method(cfg.resolution), "resolution": cfg.resolution}
    if cfg.inpaint_images is not None:
        lpips = (load_lpips_or_explain(cfg.lpips_vgg_path, cfg.lpips_heads_path, "set lpips=false to score FID only")
                 if cfg.lpips else None)
        reference = {"path": str(Path(cfg.inpaint_images).resolve()), "source": "the inpainted images' originals"}
    else:
        reference = {**check_reference(cfg.reference_stats, ours), "path": str(Path(cfg.reference_stats).resolve())}
        lpips = (load_lpips_or_explain(cfg.lpips_vgg_path, cfg.lpips_heads_path, "set sampling.image_guidance_loss=l2")
                 if cfg.sampling.image_guidance_scale > 0 and cfg.sampling.image_guidance_loss == "lpips" else None)
    start = time.perf_counter()
    sr_scores: list = []  # (index, PSNR / SSIM) of this rank's SR samples (hr_images=)
    inpainting_scores: list = []  # (index, hole fraction, bin, LPIPS) of this rank's composites (inpaint_images=)
    if cfg.images is not None:
        source = open_source(cfg.images)
        images = iter_slice(source, dist_info.rank, dist_info.world_size, cfg.resolution, cfg.num_samples)
        source_info = {"kind": "images", **source.describe()}
    else:
        bundle = load_ldm(cfg.source, cfg.weights, cfg.autoencoder)
        source_info = bundle.source
        if cfg.hr_images is not None:
            images = sr.sr_slice(bundle, cfg, dist_info, sr_scores, (out_dir / SAMPLES_DIR, out_dir / sr.LOW_RES_DIR)
                                 if cfg.save_images else None, lpips)
        elif cfg.inpaint_images is not None:
            images = inpainting.inpainting_slice(bundle, cfg, dist_info, lpips, inpainting_scores, (
                out_dir / SAMPLES_DIR, out_dir / inpainting.MASKS_DIR) if cfg.save_images else None)
        else:
            images = generated_slice(bundle, cfg, dist_info, out_dir)
    generated = gathered_features(extractor, images, cfg.inception.batch_size, dist_info)
    if cfg.inpaint_images is not None:  # gathers: every rank
        truth = gathered_features(extractor, inpainting.truth_slice(cfg, dist_info), cfg.inception.batch_size,
                                  dist_info)
        metrics = inpainting.inpainting_metrics(generated, truth, inpainting_scores, cfg.metrics)
        reference["num_samples"] = len(truth[FEATURES_2048])
    else:
        scores = sr.summarize(sr_scores) if cfg.hr_images is not None else {}
    if not dist_info.is_main:
        return None
    if cfg.inpaint_images is None:
        metrics = compute_metrics(generated, load_stats(cfg.reference_stats)[0], cfg.metrics) | scores
    num_samples = len(generated[FEATURES_2048])
    record = _record(cfg, metrics, ours, reference, source_info, num_samples, time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / METRICS_JSON, record)
    _log(cfg, out_dir, metrics, step=int(source_info.get("step") or 0))
    print0(f"{num_samples} samples vs {reference['num_samples']} reference images: "
           + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return {"out_dir": str(out_dir), "num_samples": num_samples, **metrics}


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def evaluate(cfg: EvaluateConfig) -> dict | None:
    """The job; returns {"out_dir", "num_samples", **metrics} on rank 0 (None on the others)."""
    dist_info = init_distributed(device=cfg.device)
    try:
        return _evaluate(cfg, dist_info)
    finally:
        if in_multirun():  # under torchrun a destroyed group cannot be re-made (the next point hangs):
            atexit.unregister(cleanup)  # the sweep's points share one, destroyed at exit
            atexit.register(cleanup)
        else:
            cleanup()


main = hydra_main("evaluate", EvaluateConfig, evaluate)
