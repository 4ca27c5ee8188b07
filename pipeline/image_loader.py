"""Image shards (img2dataset layout: KEY.jpg / KEY.txt / KEY.json) -> training batches.

The first-stage training job (Sec. 3.1) reads the ingest stage's shards directly. Batches
are uint8 [B, 3, R, R] (the job scales them to [-1, 1] on its device), resized so the
shorter side is R and cropped (random or center).

Splitting and determinism. Each rank runs `num_workers` DataLoader workers; together
they are G = world_size x max(num_workers, 1) "logical workers", g = rank * W + w. Every
epoch the shard list is permuted with (seed, epoch); with at least G shards, logical
worker g reads shards g, g + G, ... of that order (webdataset with an explicit
node splitter), otherwise every worker reads all shards and keeps samples g, g + G, ...
(no hang when shards are fewer than ranks x workers). A seeded shuffle buffer and seeded
random crops make each worker's stream a pure function of (seed, epoch, g). Workers
never stop: at the end of an epoch they go on with the next one.

Exact resume. A DataLoader hands out batches round-robin over its workers, and each batch
carries its worker's position (epoch, raw samples consumed in that epoch). The loader's
`state_dict()` holds every worker's position and whose turn is next; a new loader skips
to those positions (reading, not decoding, the skipped samples) and rotates the worker
order, so it yields exactly the batches the uninterrupted run would have.

Corrupt images (undecodable, or no image file in the sample) are skipped and counted; so
are truncated tars (whatever precedes the cut is used) and tars that cannot be read.
"""
import glob
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CROPS = ("random", "center")
SKIP_REASONS = ("corrupt_image", "missing_image", "truncated_tar", "tar_error")
TAR_BLOCK = 512


@dataclass
class ImageDataConfig:
    path: str = "???"              # folder of NNNNN.tar image shards, or a glob (omegaconf's MISSING)
    eval_path: str | None = None   # held-out shards; None: the last num_eval_shards of `path`
    num_eval_shards: int = 1
    resolution: int = 256          # training crop side R
    crop: str = "random"           # random | center (evaluation always uses center)
    batch_size: int = 8            # per rank
    num_workers: int = 2
    shuffle_buffer: int = 256      # samples; 0 or 1 keeps the (permuted) shard order
    seed: int = 0

    def __post_init__(self):  # runs on defaults too (Hydra's ConfigStore): data.path is checked on use
        if self.crop not in CROPS:
            raise ValueError(f"data.crop={self.crop!r}: use one of {CROPS}")
        for name in ("resolution", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name}={getattr(self, name)}: must be positive")
        for name in ("num_workers", "shuffle_buffer", "num_eval_shards"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)}: must be >= 0")


def list_shards(path: str) -> list[str]:
    """Sorted .tar shards of a folder (temporary `.tar.tmp-*` names excluded), or of a glob."""
    folder = Path(path)
    found = sorted(glob.glob(str(folder / "*.tar"))) if folder.is_dir() else sorted(glob.glob(path))
    if not found:
        raise ValueError(f"no .tar shards at {path!r}: point data.path at the output_dir of "
                         f"jobs.ingest (python -m jobs.ingest inputs=[...] output_dir=...)")
    return found


def split_train_eval(cfg: ImageDataConfig) -> tuple[list[str], list[str]]:
    """(training shards, held-out shards); held-out ones are never trained on."""
    shards = list_shards(cfg.path)
    if cfg.eval_path is not None:
        held_out = list_shards(cfg.eval_path)
        return [s for s in shards if s not in held_out], held_out
    if cfg.num_eval_shards >= len(shards):
        raise ValueError(f"data.num_eval_shards={cfg.num_eval_shards} leaves none of the {len(shards)} "
                         f"shards of {cfg.path} for training: lower it or set data.eval_path")
    split = len(shards) - cfg.num_eval_shards
    return shards[:split], shards[split:]


def decode_image(data: bytes, resolution: int, crop: str,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded image -> uint8 [3, R, R]: shorter side resized to R (bicubic), then cropped.
    Raises OSError / ValueError (PIL's) for data that is not a decodable image."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    slack_x, slack_y = size[0] - resolution, size[1] - resolution
    if crop == "random":
        left, top = int(rng.integers(slack_x + 1)), int(rng.integers(slack_y + 1))
    else:
        left, top = slack_x // 2, slack_y // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def image_bytes(sample: dict) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)


class SkipCounter:
    """Counts of skipped samples by reason; also a webdataset error handler (counts, continues)."""

    def __init__(self):
        self.counts = dict.fromkeys(SKIP_REASONS, 0)

    def __call__(self, exn: Exception) -> bool:
        self.counts["tar_error"] += 1
        return True

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.counts[r] for r in SKIP_REASONS], dtype=torch.int64)


def is_complete_tar(path: str) -> bool:
    """Ends with the end-of-archive marker (two zero blocks, POSIX): a cut-off copy does not.
    Needed because tarfile's stream mode ends a truncated archive silently."""
    size = Path(path).stat().st_size
    if size < 2 * TAR_BLOCK or size % TAR_BLOCK:
        return False
    with open(path, "rb") as f:
        f.seek(size - 2 * TAR_BLOCK)
        return not any(f.read(2 * TAR_BLOCK))


def read_samples(shards: list[str], errors: SkipCounter, splitter=None) -> Iterator[dict]:
    """Raw samples of `shards` in order, through a webdataset pipeline: shard list, the explicit
    node/worker `splitter` (None: read them all), truncation check, tar reading and grouping."""
    import webdataset as wds

    def count_truncated(items):
        for item in items:
            if not is_complete_tar(item["url"]):
                errors.counts["truncated_tar"] += 1  # what precedes the cut is still read
            yield item
    stages = [wds.SimpleShardList(shards)] + ([splitter] if splitter is not None else [])
    stages += [count_truncated, wds.tarfile_to_samples(handler=errors)]
    return iter(wds.DataPipeline(*stages))


def every_nth(offset: int, step: int):
    """A webdataset splitter (or any iterable filter) keeping items offset, offset + step, ..."""
    def split(items):
        for i, item in enumerate(items):
            if i % step == offset:
                yield item
    return split


def shuffled(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Seeded shuffle buffer: a pure function of the input order and rng."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        j = int(rng.integers(buffer_size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class ShardStream(IterableDataset):
    """One rank's infinite stream of batches dicts (see module doc); used through ImageShardLoader."""

    def __init__(self, shards: list[str], cfg: ImageDataConfig, rank: int, world_size: int,
                 positions: list[tuple[int, int]], first_worker: int):
        self.shards, self.cfg, self.rank, self.world_size = shards, cfg, rank, world_size
        self.positions, self.first_worker = positions, first_worker

    def _epoch_samples(self, g: int, num_logical: int, epoch: int, errors: SkipCounter) -> Iterator[dict]:
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if len(shards) >= num_logical:
            samples = read_samples(shards, errors, splitter=every_nth(g, num_logical))
        else:  # fewer shards than workers: split by sample instead of by shard
            samples = every_nth(g, num_logical)(read_samples(shards, errors))
        if self.cfg.shuffle_buffer > 1:
            rng = np.random.default_rng([self.cfg.seed, epoch, g, 1])
            samples = shuffled(samples, self.cfg.shuffle_buffer, rng)
        return samples

    def _decode(self, sample: dict, key: list[int], errors: SkipCounter) -> np.ndarray | None:
        data = image_bytes(sample)
        if data is None:
            errors.counts["missing_image"] += 1
            return None
        try:
            return decode_image(data, self.cfg.resolution, self.cfg.crop, np.random.default_rng(key))
        except (OSError, ValueError, Image.DecompressionBombError):
            errors.counts["corrupt_image"] += 1
            return None

    def _images(self, g: int, num_logical: int, errors: SkipCounter, epoch: int,
                skip: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, raw samples consumed, image) forever, from epoch `epoch` after `skip` samples."""
        while True:
            num_raw = num_decoded = 0
            for position, sample in enumerate(self._epoch_samples(g, num_logical, epoch, errors)):
                num_raw += 1
                if position < skip:
                    continue  # resume: consumed before the checkpoint; read, not decoded
                image = self._decode(sample, [self.cfg.seed, epoch, g, position, 2], errors)
                if image is not None:
                    num_decoded += 1
                    yield epoch, position + 1, image
            if num_raw == 0 or (num_decoded == 0 and skip == 0):  # would spin forever
                raise ValueError(f"logical data worker {g} found no decodable images in an epoch of "
                                 f"{len(self.shards)} shards (first {self.shards[0]}): check data.path")
            epoch, skip = epoch + 1, 0

    def _batches(self, w: int, g: int, num_logical: int) -> Iterator[dict]:
        """Batches of logical worker g, each with the position after it and new skip counts."""
        errors, images, reported = SkipCounter(), [], torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
        for epoch, position, image in self._images(g, num_logical, errors, *self.positions[w]):
            images.append(image)
            if len(images) == self.cfg.batch_size:
                counts = errors.as_tensor()
                yield {"images": torch.from_numpy(np.stack(images)), "worker": w,
                       "position": torch.tensor([epoch, position]), "skipped": counts - reported}
                images, reported = [], counts

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        worker_id = info.id if info is not None else 0
        w = (worker_id + self.first_worker) % num_workers  # resume: rotate whose turn is first
        g = self.rank * num_workers + w
        return self._batches(w, g, self.world_size * num_workers)


class ImageShardLoader:
    """This rank's infinite iterator of uint8 batches [B, 3, R, R] with an exact-resume state."""

    def __init__(self, shards: list[str], cfg: ImageDataConfig, rank: int = 0, world_size: int = 1):
        self.shards, self.cfg, self.rank, self.world_size = shards, cfg, rank, world_size
        self.num_logical = max(cfg.num_workers, 1)
        self.positions = [(0, 0)] * self.num_logical  # (epoch, raw samples consumed) per worker
        self.next_worker = 0
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)

    def state_dict(self) -> dict:
        return {"positions": [list(p) for p in self.positions], "next_worker": self.next_worker,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["positions"]) != self.num_logical:
            raise ValueError(f"the checkpoint's data position has {len(state['positions'])} workers per rank: "
                             f"set data.num_workers={len(state['positions'])} (0 means 1) to resume exactly")
        self.positions = [tuple(int(v) for v in p) for p in state["positions"]]
        self.next_worker = int(state["next_worker"])
        self.skipped = {r: int(state["skipped"].get(r, 0)) for r in SKIP_REASONS}

    def __iter__(self) -> Iterator[torch.Tensor]:
        stream = ShardStream(self.shards, self.cfg, self.rank, self.world_size, list(self.positions),
                             self.next_worker)
        # Its own generator: creating the iterator must not draw from the global torch RNG,
        # which the training run's checkpoints capture and restore.
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                            prefetch_factor=2 if self.cfg.num_workers else None,
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        for batch in loader:
            self.positions[batch["worker"]] = tuple(int(v) for v in batch["position"])
            self.next_worker = (batch["worker"] + 1) % self.num_logical
            for reason, count in zip(SKIP_REASONS, batch["skipped"].tolist()):
                self.skipped[reason] += count
            yield batch["images"]


def iter_eval_batches(shards: list[str], resolution: int, batch_size: int, rank: int = 0,
                      world_size: int = 1, max_images: int | None = None) -> Iterator[torch.Tensor]:
    """Held-out images in shard order, center-cropped, this rank's share (sample i % world_size):
    uint8 batches [b, 3, R, R]; the same images whatever the batch size."""
    errors, images = SkipCounter(), []
    for i, sample in enumerate(read_samples(shards, errors)):
        if max_images is not None and i >= max_images:
            break
        data = image_bytes(sample) if i % world_size == rank else None
        if data is None:
            continue
        try:
            images.append(decode_image(data, resolution, "center"))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if len(images) == batch_size:
            yield torch.from_numpy(np.stack(images))
            images = []
    if images:
        yield torch.from_numpy(np.stack(images))
