"""`python -m jobs.sample source=RUN_OR_CKPT_OR_EXPORT prompts=[...] out_dir=samples/x`: PNGs, a grid, samples.json.

    python -m jobs.sample source=runs/t2i 'prompts=[a red circle,a blue square]' num_per_prompt=4 \
        sampling.num_steps=50 sampling.guidance_scale=5 out_dir=samples/x
    torchrun --nproc_per_node=8 -m jobs.sample source=exports/t2i prompt_file=prompts.txt out_dir=samples/y
    python -m jobs.sample source=exports/cin class_ids=[1,7] out_dir=samples/z     # class-conditional
    python -m jobs.sample source=exports/sr images=lowres/ out_dir=samples/sr     # super-resolution
    python -m jobs.sample source=runs/semantic maps=maps/ out_dir=samples/sem     # semantic synthesis
    python -m jobs.sample source=runs/layout layouts=boxes.jsonl out_dir=samples/l  # layout-to-image
    python -m jobs.sample ... indices=[17]             # regenerate sample 17 alone, identical

Global index i: condition i // num_per_prompt (prompt, class id or image, in the given order), seed
`seed + i` (jobs.sample.generate: the image depends on that seed alone, not on batches or ranks). Under
torchrun / srun rank r makes indices r, r + W, ... of the selection; every PNG is written to a temp
name and renamed. After a barrier rank 0 writes grid.png (the lowest `grid_max` indices of this run,
one row per condition) and samples.json (every sample's index, file, seed and condition, plus the
settings and the source). A rerun into the same out_dir (e.g. `indices=[17]`) merges its samples into
samples.json when the settings match, and refuses before any work when they do not.
"""
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.config import hydra_main
from jobs.distributed import DistInfo, barrier, cleanup, init_distributed, print0
from jobs.metrics import image_grid
from jobs.sample.config import SampleConfig
from jobs.sample.generate import (
    Conditions,
    check_request,
    describe,
    generate,
    image_size,
    seeds_for,
)
from jobs.sample.conditions import layout_tokens
from ldm.diffusion.layout import Box
from pipeline.conditions.layouts import parse_boxes, read_layout_tokens
from pipeline.models.weights import load_lpips_or_explain
from pipeline.shards import atomic_write_bytes, atomic_write_json

SAMPLES_FORMAT = "ldm-pipeline/samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SEED_RULE = "sample seed = seed + global index"


@dataclass
class SamplePlan:
    """The samples a run can make: global index i -> condition i // per_condition."""
    total: int
    per_condition: int
    key: str | None                  # the samples.json field of the condition (prompt, class_id, image)
    labels: list                     # per condition: what samples.json records
    values: list | torch.Tensor | None  # per condition: what `Conditions` takes
    masks: torch.Tensor | None = None
    mask_labels: list | None = None
    guide_targets: torch.Tensor | None = None  # per condition (per row when unconditional): image guiding
    guide_labels: list | None = None
    tokenizer: dict | None = None    # layouts read as stored tokens: the tokenizer they were stored with

    def conditions(self, indices: list[int]) -> Conditions:
        rows = [i // self.per_condition for i in indices]
        guides = None if self.guide_targets is None else self.guide_targets[rows]
        if self.key is None:
            return Conditions(guide_targets=guides)
        if self.key == "image":
            return Conditions(images=self.values[rows], masks=None if self.masks is None else self.masks[rows],
                              guide_targets=guides)
        if self.key == "map":
            return Conditions(maps=self.values[rows], guide_targets=guides)
        values = [self.values[r] for r in rows]
        if self.key == "layout":
            return Conditions(layouts=values, guide_targets=guides)
        if self.key == "prompt":
            return Conditions(prompts=values, guide_targets=guides)
        return Conditions(class_ids=values, guide_targets=guides)

    def record(self, index: int, seed: int) -> dict:
        out = {"index": index, "file": png_name(index), "seed": seed}
        if self.key is not None:
            out[self.key] = self.labels[index // self.per_condition]
        if self.masks is not None:
            out["mask"] = self.mask_labels[index // self.per_condition]
        if self.guide_targets is not None:
            out["guide_image"] = self.guide_labels[index // self.per_condition]
        return out


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def _read_prompts(path: str) -> list[str]:
    if not Path(path).is_file():
        raise ValueError(f"prompt_file={path!r} does not exist: give a text file with one prompt per line")
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt_file={path!r} holds no prompts: one prompt per line")
    return prompts


def _read_layouts(path: str) -> tuple[list, list[list[Box]] | torch.Tensor, dict | None]:
    """(what samples.json records, the layouts, the tokenizer they were stored with) of a JSON-lines file
    holding one list of boxes per line (no tokenizer: the model's encodes them), or of a layout latent folder
    (each sample's stored tokens, crop included; samples.json records its key)."""
    if Path(path).is_dir():
        keys, tokens, spec = read_layout_tokens(path)
        return [{"latent_key": key} for key in keys], torch.from_numpy(tokens), spec
    if not Path(path).is_file():
        raise ValueError(f"layouts={path!r} does not exist: give a JSON-lines file, one list of boxes per line")
    labels, layouts = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            layouts.append(parse_boxes(line, f"layouts={path!r} line {number}"))
            labels.append(json.loads(line))
    if not layouts:
        raise ValueError(f"layouts={path!r} holds no layouts: one JSON list of boxes per line")
    return labels, layouts, None


def check_layouts(bundle, plan: SamplePlan) -> None:
    """ValueError before any sample for layouts the model cannot take: bad boxes, or stored tokens of
    another tokenizer than the one the model was trained with."""
    if plan.tokenizer is not None and plan.tokenizer != bundle.tokenizer:
        raise ValueError(f"the layouts were stored with tokenizer {plan.tokenizer}, the model was trained with "
                         f"{bundle.tokenizer}: precompute them with the model's layout settings")
    layout_tokens(bundle, list(plan.values))


def _image_files(path: str, key: str) -> list[Path]:
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{key}={path!r} is neither an image file nor a folder holding {IMAGE_SUFFIXES} images")
    return files


def _load_images(files: list[Path], mode: str, key: str) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] (mode RGB) or [N, 1, H, W] in {0, 1} (mode L, white = 1)."""
    arrays = [np.asarray(Image.open(f).convert(mode)) for f in files]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"{key}: the images have different sizes {sorted({a.shape[:2] for a in arrays})}; "
                         "give images of one size")
    x = torch.from_numpy(np.stack(arrays)).float()
    return (x.permute(0, 3, 1, 2) / 127.5 - 1) if mode == "RGB" else (x[:, None] > 127.5).float()


def _load_maps(files: list[Path], key: str) -> torch.Tensor:
    """[N, H, W] int64 class ids of grey (mode L) or palette (mode P: its indices) PNG maps."""
    arrays = []
    for f in files:
        with Image.open(f) as opened:
            if opened.mode not in ("L", "P"):
                raise ValueError(f"{key}: {f} is a {opened.mode} image, not a map of class ids: store the ids as "
                                 "an 8-bit grey PNG")
            arrays.append(np.asarray(opened))
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"{key}: the maps have different sizes {sorted({a.shape for a in arrays})}; "
                         "give maps of one size")
    return torch.from_numpy(np.stack(arrays)).long()


def check_maps(bundle, plan: SamplePlan, key: str = "maps") -> None:
    """Every map's ids below the preset's classes; ValueError naming the first file that is not."""
    num_classes = bundle.preset.conditioner.rescaler_in_channels
    for label, ids in zip(plan.labels, plan.values):
        if int(ids.max()) >= num_classes:
            raise ValueError(f"{key}: {label} holds class id {int(ids.max())}, preset {bundle.preset_name!r} reads "
                             f"{num_classes} classes (0..{num_classes - 1}): fix the map or sample another model")


def build_plan(cfg: SampleConfig) -> SamplePlan:
    """The conditions the command line names, read once (every rank reads the same files), with the
    guide targets of image guiding: one per condition, or the rows themselves for an unconditional model."""
    if cfg.guide_images is None:
        return _condition_plan(cfg)
    files = _image_files(cfg.guide_images, "guide_images")
    plan = _condition_plan(cfg) if cfg.given_conditions() else SamplePlan(len(files) * cfg.num_per_prompt,
                                                                          cfg.num_per_prompt, None, [], None)
    rows = plan.total // plan.per_condition
    if plan.key is not None and len(files) != rows:
        raise ValueError(f"{len(files)} guide_images for {rows} conditions: give one guide target per condition, "
                         "in the same order")
    plan.guide_targets, plan.guide_labels = _load_images(files, "RGB", "guide_images"), [str(f) for f in files]
    return plan


def _condition_plan(cfg: SampleConfig) -> SamplePlan:
    n = cfg.num_per_prompt
    if cfg.prompts is not None or cfg.prompt_file is not None:
        prompts = list(cfg.prompts) if cfg.prompts is not None else _read_prompts(cfg.prompt_file)
        return SamplePlan(len(prompts) * n, n, "prompt", prompts, prompts)
    if cfg.layouts is not None:
        labels, layouts, tokenizer = _read_layouts(cfg.layouts)
        return SamplePlan(len(layouts) * n, n, "layout", labels, layouts, tokenizer=tokenizer)
    if cfg.class_ids is not None:
        ids = [int(c) for c in cfg.class_ids]
        return SamplePlan(len(ids) * n, n, "class_id", ids, ids)
    if cfg.images is not None:
        files = _image_files(cfg.images, "images")
        plan = SamplePlan(len(files) * n, n, "image", [str(f) for f in files], _load_images(files, "RGB", "images"))
        if cfg.masks is not None:
            masks = _image_files(cfg.masks, "masks")
            if len(masks) != len(files):
                raise ValueError(f"{len(masks)} masks for {len(files)} images: give one mask per image")
            plan.masks, plan.mask_labels = _load_images(masks, "L", "masks"), [str(f) for f in masks]
            if plan.masks.shape[2:] != plan.values.shape[2:]:
                (mh, mw), (h, w) = plan.masks.shape[2:], plan.values.shape[2:]
                raise ValueError(f"masks={cfg.masks!r}: {masks[0].name} is {mw}x{mh}, its image {files[0].name} "
                                 f"(images={cfg.images!r}) is {w}x{h}: give each mask its image's size")
        return plan
    if cfg.maps is not None:
        files = _image_files(cfg.maps, "maps")
        return SamplePlan(len(files) * n, n, "map", [str(f) for f in files], _load_maps(files, "maps"))
    if cfg.num_samples is None:
        raise ValueError("nothing to condition on: pass prompts / prompt_file / class_ids / images / maps / layouts, or "
                         "num_samples=N for an unconditional model")
    return SamplePlan(cfg.num_samples, 1, None, [], None)


def selected_indices(cfg: SampleConfig, plan: SamplePlan) -> list[int]:
    if cfg.indices is None:
        return list(range(plan.total))
    bad = [i for i in cfg.indices if i >= plan.total]
    if bad:
        raise ValueError(f"indices {bad[:5]} out of range: this run has {plan.total} samples (0..{plan.total - 1})")
    return sorted(set(int(i) for i in cfg.indices))


def run_header(cfg: SampleConfig, bundle, size: tuple[int, int], classifier_record: dict | None = None) -> dict:
    """Everything samples.json says about how its samples were made (JSON-normalised); with classifier
    guidance, which classifier (its folder, training step, preset and classes)."""
    header = {"format": SAMPLES_FORMAT, "version": 1, "source": bundle.source, "preset": bundle.preset_name,
              "objective": bundle.objective, "scale_factor": bundle.scale_factor, "sampling": asdict(cfg.sampling),
              "image_size": list(size), "seed": cfg.seed, "seed_rule": SEED_RULE,
              "num_per_prompt": cfg.num_per_prompt}
    if classifier_record is not None:
        header["classifier"] = {"path": str(cfg.classifier), "step": classifier_record["step"],
                                "preset": classifier_record["preset"], "num_classes": classifier_record["num_classes"],
                                "scale": cfg.sampling.classifier_scale}
    return json.loads(json.dumps(header, default=str))


def _comparable(header: dict) -> dict:
    # The batch size does not change any sample (jobs.sample.generate), so runs may differ in it.
    return {**header, "sampling": {k: v for k, v in header["sampling"].items() if k != "batch_size"}, "samples": None}


def previous_samples(out_dir: Path, header: dict) -> list[dict]:
    """Samples already recorded in out_dir/samples.json; ValueError if they were made differently."""
    path = out_dir / "samples.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if _comparable(old) != _comparable(header):
        diff = sorted(k for k in set(old) | set(header) if k != "samples" and old.get(k) != header.get(k))
        raise ValueError(f"out_dir={str(out_dir)!r} holds samples made with other settings ({', '.join(diff)}): "
                         "choose another out_dir, or rerun with the same settings")
    return old["samples"]


def write_grid(out_dir: Path, indices: list[int], num_columns: int) -> None:
    images = [np.asarray(Image.open(out_dir / png_name(i)).convert("RGB")) for i in indices]
    grid = image_grid(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), num_columns)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    atomic_write_bytes(out_dir / "grid.png", buffer.getvalue())


def write_png(path: Path, image_HW3: torch.Tensor) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image_HW3.numpy()).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="rank 0", dynamic_ncols=True)


def _sample_my_share(cfg: SampleConfig, bundle, plan: SamplePlan, indices: list[int], dist_info: DistInfo,
                     lpips=None, classifier=None) -> None:
    mine = indices[dist_info.rank::dist_info.world_size]
    bar = _progress_bar(cfg.progress_bar and dist_info.is_main, len(mine))
    for start in range(0, len(mine), cfg.sampling.batch_size):
        batch = mine[start:start + cfg.sampling.batch_size]
        images = generate(bundle, plan.conditions(batch), seeds_for(batch, cfg.seed), cfg.sampling, dist_info.device,
                          lpips=lpips, classifier=classifier)
        for index, image in zip(batch, images):
            write_png(Path(cfg.out_dir) / png_name(index), image)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()


def _finish(cfg: SampleConfig, plan: SamplePlan, indices: list[int], header: dict, previous: list[dict]) -> None:
    """samples.json: this run's samples merged with those already recorded; grid.png: the lowest
    `grid_max` recorded indices (one row per condition when they are contiguous)."""
    out_dir = Path(cfg.out_dir)
    seeds = seeds_for(indices, cfg.seed)
    records = {r["index"]: r for r in previous} | {i: plan.record(i, s) for i, s in zip(indices, seeds)}
    atomic_write_json(out_dir / "samples.json", header | {"samples": [records[i] for i in sorted(records)]})
    shown = [i for i in sorted(records) if (out_dir / png_name(i)).is_file()][:cfg.grid_max]
    if shown:
        columns = plan.per_condition if plan.key is not None else math.ceil(math.sqrt(len(shown)))
        write_grid(out_dir, shown, min(columns, len(shown)))


def _check_classifier(cfg: SampleConfig, bundle, first: Conditions,
                      seeds: list[int]) -> tuple[torch.nn.Module | None, dict | None]:
    """check_request with the classifier of classifier guidance (App. D.4), if any, which must also have
    learned the model's noise; returns (classifier, its record) or (None, None)."""
    if cfg.classifier is None:
        check_request(bundle, first, seeds, cfg.sampling)
        return None, None
    from jobs.train_classifier.checkpoint import check_classifier_fits, load_classifier

    classifier, record = load_classifier(cfg.classifier)
    check_request(bundle, first, seeds, cfg.sampling, classifier=classifier)
    check_classifier_fits(record, bundle, cfg.classifier)
    return classifier, record


def sample(cfg: SampleConfig) -> dict | None:
    """The job: every rank samples its share of the selected indices; rank 0 writes grid and JSON."""
    from pipeline.models.bundle import load_ldm

    dist_info = init_distributed(device=cfg.device)
    try:
        plan = build_plan(cfg)
        indices = selected_indices(cfg, plan)
        bundle = load_ldm(cfg.source, weights=cfg.weights, autoencoder=cfg.autoencoder)
        first = plan.conditions(indices[:1])
        # fails before any work
        classifier, classifier_record = _check_classifier(cfg, bundle, first, seeds_for(indices[:1], cfg.seed))
        if plan.key == "map":
            check_maps(bundle, plan)
        if plan.key == "layout":
            check_layouts(bundle, plan)  # every layout, before any sample
        lpips = None
        if cfg.sampling.image_guidance_scale > 0 and cfg.sampling.image_guidance_loss == "lpips":
            lpips = load_lpips_or_explain(cfg.lpips_vgg_path, cfg.lpips_heads_path,
                                          "set sampling.image_guidance_loss=l2")
        size = image_size(bundle, cfg.sampling, first)
        out_dir = Path(cfg.out_dir)
        header = run_header(cfg, bundle, size, classifier_record)
        previous = previous_samples(out_dir, header)
        out_dir.mkdir(parents=True, exist_ok=True)
        print0(f"sampling {len(indices)} images of {size[0]}x{size[1]} from {describe(bundle)} on "
               f"{dist_info.world_size} rank(s) into {out_dir}")
        start = time.perf_counter()
        _sample_my_share(cfg, bundle, plan, indices, dist_info, lpips, classifier)
        barrier()
        seconds = time.perf_counter() - start
        if dist_info.is_main:
            _finish(cfg, plan, indices, header, previous)
        barrier()
        if not dist_info.is_main:
            return None  # one summary line per job, not per rank
        return {"out_dir": str(out_dir), "num_samples": len(indices), "world_size": dist_info.world_size,
                "image_size": list(size), "seconds": round(seconds, 2),
                "samples_per_s": round(len(indices) / max(seconds, 1e-9), 3)}
    finally:
        cleanup()


main = hydra_main("sample", SampleConfig, sample)
