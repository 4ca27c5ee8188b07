"""Inception features of image sets and the sample-quality metrics of the paper's tables.

FID (Heusel et al. 2017; the paper's Tab. 1-3, 6-7), IS (Salimans et al. 2016), KID (Binkowski et
al. 2018) and precision-recall (Kynkaanniemi et al. 2019; the paper's Tab. 1-3 "Prec." / "Recall").
The maths is torch-fidelity's own functions on features from its own network (jobs.evaluate.inception),
fed the input it expects (uint8 [N, 3, H, W]; it resizes to 299^2 itself), so numbers equal
`torch_fidelity.calculate_metrics` on the same images by construction:

    FID <- fid_features_to_statistics + fid_statistics_to_metric    (2048-d pool features)
    IS  <- isc_features_to_metric                                   (logits without the fc bias)
    KID <- kid_features_to_metric                                   (2048-d, polynomial kernel)
    P/R <- prc_features_to_metric                                   (2048-d Inception features here;
                                                                     torch-fidelity's default is VGG16)

Image sets are a folder of PNG/JPG files (torch-fidelity's non-recursive listing, sorted) or of
WebDataset tar shards (sorted, samples in tar order). Image i of the sorted list has GLOBAL index
i; a rank reads the images with i % world_size == rank, and features are put back in index order,
so every number is the same whatever the number of ranks.
"""
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file, save_file
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from jobs.evaluate.inception import FEATURES_2048, LOGITS
from pipeline.shards import atomic_folder, atomic_write_json, iter_samples

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # torch-fidelity's samples_find_ext
STATS_FILE, PROTOCOL_FILE = "stats.safetensors", "protocol.json"
STATS_FORMAT = "ldm-pipeline/fid-stats"
# What makes two feature sets comparable; a stats cache must also match its source and sample count.
PROTOCOL_KEYS = ("feature_extractor", "weights_sha256", "resize", "resolution")
INCEPTION_RESIZE = "torch-fidelity tf1-bilinear to 299x299"
CROP_RESIZE = "torchvision Resize(shorter side, bilinear, antialias) + CenterCrop"


def resize_method(resolution: int | None) -> str:
    """The protocol's "resize": what happens to an image before Inception sees it."""
    return INCEPTION_RESIZE if resolution is None else f"{CROP_RESIZE} to {resolution}, then {INCEPTION_RESIZE}"


# ------------------------------------------------------------------------------------ image sets


@dataclass(frozen=True)
class ImageSource:
    path: Path
    kind: str                 # "images" (PNG/JPG files) | "shards" (WebDataset tars)
    files: tuple[Path, ...]   # sorted

    def describe(self) -> dict:
        """The protocol's "source": enough to tell whether a cache was made from this set."""
        listing = [(f.name, f.stat().st_size) for f in self.files]
        return {"path": str(self.path), "kind": self.kind, "num_files": len(self.files),
                "listing_sha256": _sha256_json(listing)}


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def open_source(path: str | Path) -> ImageSource:
    """A folder of tar shards (if it holds any *.tar) or of PNG/JPG images, not recursive."""
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise ValueError(f"{path!r} is not a folder: give a folder of image shards (*.tar) or of PNG/JPG files")
    shards = tuple(sorted(folder.glob("*.tar")))
    if shards:
        return ImageSource(folder, "shards", shards)
    images = tuple(sorted(f for f in folder.iterdir() if _is_image(f)))
    if not images:
        raise ValueError(f"{path!r} holds no *.tar shards and no {'/'.join(IMAGE_EXTENSIONS)} images")
    return ImageSource(folder, "images", images)


def _encoded_images(source: ImageSource, errors: dict) -> Iterator[bytes | Path]:
    """Every image of the set in global index order, still encoded (decoding is per rank)."""
    if source.kind == "images":
        yield from source.files
        return
    for shard in source.files:
        for sample in iter_samples(shard, errors):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                errors["no_image"] = errors.get("no_image", 0) + 1
                continue
            yield sample[ext]


def to_pil(image: bytes | Path | np.ndarray) -> Image.Image:
    """RGB PIL image from encoded bytes, a file, or a uint8 HxWx3 array (as torch-fidelity opens files)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        return opened.convert("RGB")


def to_inception_input(image: Image.Image, resolution: int | None) -> torch.Tensor:
    """uint8 [3, H, W], optionally resized + centre-cropped as torch-fidelity's samples_resize_and_crop."""
    if resolution is not None:
        image = T.CenterCrop(resolution)(T.Resize(resolution)(image))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def iter_slice(source: ImageSource, rank: int, world_size: int, resolution: int | None = None,
               max_samples: int | None = None, errors: dict | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(global index, uint8 [3, H, W]) of this rank's images (index % world_size == rank), in order.

    An image that does not decode is skipped and counted in errors["corrupt_image"]; its index
    stays taken, so the others keep theirs on every rank.
    """
    errors = {} if errors is None else errors
    listing_errors = errors if rank == 0 else {}  # every rank lists every image: count those once
    for index, encoded in enumerate(_encoded_images(source, listing_errors)):
        if max_samples is not None and index >= max_samples:
            return
        if index % world_size != rank:
            continue
        try:
            image = to_pil(encoded)
        except (OSError, ValueError):
            errors["corrupt_image"] = errors.get("corrupt_image", 0) + 1
            continue
        yield index, to_inception_input(image, resolution)


def same_size_batches(images: Iterable[tuple[int, torch.Tensor]], batch_size: int,
                      key: str) -> Iterator[tuple[list[int], np.ndarray]]:
    """(global indices, uint8 [B, H, W, 3]) of `images` (iter_slice's pairs) in batches of one size;
    ValueError naming `key` (the config entry of the set) when a batch mixes sizes."""
    images = iter(images)
    while chunk := [item for _, item in zip(range(batch_size), images)]:
        indices = [index for index, _ in chunk]
        arrays = [image.numpy().transpose(1, 2, 0) for _, image in chunk]
        sizes = {x.shape[:2] for x in arrays}
        if len(sizes) > 1:
            raise ValueError(f"{key}: images {indices} have different sizes {sorted(sizes)}; give crops of one "
                             "size (as precompute cuts them)")
        yield indices, np.stack(arrays)


# ------------------------------------------------------------------------------------ features


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, images: Iterable[tuple[int, torch.Tensor]], batch_size: int,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """{"index": [N] int64, "2048": [N, 2048], "logits_unbiased": [N, 1008]} (float32, CPU).

    Consecutive images of equal size share a batch (Inception resizes each image on its own, so the
    batching does not change a feature beyond float rounding)."""
    parts: dict[str, list[torch.Tensor]] = {"index": [], FEATURES_2048: [], LOGITS: []}

    def flush(batch: list[tuple[int, torch.Tensor]]) -> None:
        images_N3HW = torch.stack([image for _, image in batch]).to(device)
        features_N2048, logits_N1008 = extractor(images_N3HW)
        parts["index"].append(torch.tensor([index for index, _ in batch], dtype=torch.int64))
        parts[FEATURES_2048].append(features_N2048.float().cpu())
        parts[LOGITS].append(logits_N1008.float().cpu())

    batch: list[tuple[int, torch.Tensor]] = []
    for index, image in images:
        if batch and (len(batch) == batch_size or image.shape != batch[0][1].shape):
            flush(batch)
            batch = []
        batch.append((index, image))
    if batch:
        flush(batch)
    if not parts["index"]:
        return {"index": torch.zeros(0, dtype=torch.int64), FEATURES_2048: torch.zeros(0, 2048),
                LOGITS: torch.zeros(0, 1008)}
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def in_index_order(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every rank's extract_features output, merged and sorted by global index."""
    merged = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    order = torch.argsort(merged["index"])
    merged = {name: tensor[order] for name, tensor in merged.items()}
    assert torch.equal(merged["index"], torch.unique(merged["index"])), "two ranks extracted the same index"
    return merged


def statistics(features_N2048: torch.Tensor) -> dict[str, torch.Tensor]:
    """FID's Gaussian fit {"mu" [2048] float32, "sigma" [2048, 2048] float64}, torch-fidelity's maths."""
    if len(features_N2048) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(features_N2048)}")
    stats = fid_features_to_statistics(features_N2048)
    return {"mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"])}


# ------------------------------------------------------------------------------------ stats files


def save_stats(folder: str | Path, tensors: dict[str, torch.Tensor], protocol: dict) -> Path:
    """A stats folder (stats.safetensors + protocol.json), written under a temp name then renamed,
    so a killed job never leaves one that looks complete. An existing folder is replaced."""
    with atomic_folder(folder) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATS_FILE))
        atomic_write_json(tmp / PROTOCOL_FILE, {"format": STATS_FORMAT, "version": 1, **protocol})
    return Path(folder)


def read_protocol(folder: str | Path) -> dict | None:
    """The protocol of a complete stats folder, or None if there is none."""
    folder = Path(folder)
    if not (folder / STATS_FILE).is_file() or not (folder / PROTOCOL_FILE).is_file():
        return None
    return json.loads((folder / PROTOCOL_FILE).read_text())


def load_stats(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    protocol = read_protocol(folder)
    if protocol is None or protocol.get("format") != STATS_FORMAT:
        raise ValueError(f"{folder!r} is not a reference-statistics folder: make one with "
                         f"`python -m jobs.fid_stats reference=IMAGES out={folder}`")
    return load_file(str(Path(folder) / STATS_FILE)), protocol


def mismatched_keys(found: dict, wanted: dict, keys: Iterable[str]) -> list[str]:
    return [key for key in keys if found.get(key) != wanted.get(key)]


# ------------------------------------------------------------------------------------ metrics


@dataclass
class MetricsConfig:
    fid: bool = True
    isc: bool = True
    kid: bool = True
    prc: bool = True
    isc_splits: int = 10          # torch-fidelity's defaults from here on
    kid_subsets: int = 100
    kid_subset_size: int = 1000   # lowered to the smaller set's size when a set is smaller
    prc_neighborhood: int = 3
    rng_seed: int = 2020

    def __post_init__(self):
        if not (self.fid or self.isc or self.kid or self.prc):
            raise ValueError("metrics: every metric is off; set at least one of metrics.fid/isc/kid/prc=true")
        for key in ("isc_splits", "kid_subsets", "kid_subset_size", "prc_neighborhood"):
            if getattr(self, key) < 1:
                raise ValueError(f"metrics.{key}={getattr(self, key)}: must be >= 1")


def kid_subset_size(cfg: MetricsConfig, num_generated: int, num_reference: int) -> int:
    """metrics.kid_subset_size, lowered to the smaller set (torch-fidelity would refuse a larger one)."""
    return min(cfg.kid_subset_size, num_generated, num_reference)


def compute_metrics(generated: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    cfg: MetricsConfig) -> dict[str, float]:
    """torch-fidelity's metrics of `generated` (its input1) against `reference` (input2), with its
    key names. Both dicts hold "2048" features; `generated` also "logits_unbiased", `reference`
    also "mu" / "sigma"."""
    gen_N2048, ref_N2048 = generated[FEATURES_2048], reference[FEATURES_2048]
    if cfg.isc and len(gen_N2048) < cfg.isc_splits:
        raise ValueError(f"IS over {cfg.isc_splits} splits needs at least as many samples: raise num_samples "
                         f"or lower metrics.isc_splits (have {len(gen_N2048)})")
    out: dict[str, float] = {}
    if cfg.fid:
        gen_stats = {k: v.numpy() for k, v in statistics(gen_N2048).items()}
        ref_stats = {"mu": reference["mu"].numpy(), "sigma": reference["sigma"].numpy()}
        out.update(fid_statistics_to_metric(gen_stats, ref_stats, verbose=False))
    if cfg.isc:
        out.update(isc_features_to_metric(generated[LOGITS], cfg.isc_splits, shuffle=True, rng_seed=cfg.rng_seed))
    if cfg.kid:
        out.update(kid_features_to_metric(gen_N2048, ref_N2048, kid_subsets=cfg.kid_subsets,
                                          kid_subset_size=kid_subset_size(cfg, len(gen_N2048), len(ref_N2048)),
                                          rng_seed=cfg.rng_seed, verbose=False))
    if cfg.prc:  # save_cpu_ram: the same numbers in row blocks, not N x N matrices (50k x 50k is 10 GB)
        out.update(prc_features_to_metric(gen_N2048, ref_N2048, prc_neighborhood=cfg.prc_neighborhood,
                                          prc_batch_size=10000, save_cpu_ram=True, verbose=False))
    return out
