"""The training data loader over latent shards: sharded across ranks and workers, shuffled
deterministically for (seed, epoch), infinite over epochs, with exact sample-level resume.

How a rank's batches are defined (all pure functions of the config, rank and world size):
- epoch e orders the global sample ids (`EpochOrder`); rank r takes the r-th of world_size
  equal contiguous blocks of that order (sample-level sharding: any number of shards works for
  any ranks x workers, nothing ever waits on an empty split);
- the rank's k-th batch overall (k counts across epochs) is batch `k % batches_per_epoch` of
  epoch `k // batches_per_epoch`;
- with W DataLoader workers, worker w makes batches start + w, start + w + W, ...; the DataLoader
  hands them out round-robin in order, so the caller sees batch start, start + 1, ... whatever W.

Hence the number of batches the caller consumed fixes the position of the rank and of each of its
workers; `state_dict()` records it (plus what the order depends on) and `load_state_dict()` restarts
every worker right after the last consumed batch. Batches prefetched but not consumed are made again.

What a batch holds besides z follows the model's condition y (Sec. 3.3): token ids for a text
transformer trained jointly, a frozen text encoder's stored context, or a class label, read from
each sample's metadata (`label_key`) or looked up from its caption in a classes.txt (`classes_file`);
a spatial condition concatenated with z_t (`condition`: the low-res image of super-resolution, made
from the stored HR crop per seed, epoch and sample: pipeline.conditions).
"""
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.conditions import CONDITION_FILES, CONDITIONS, condition_rng, make_condition
from pipeline.conditions.masks import MASK_SETTINGS
from pipeline.latents.manifest import check_compatible, missing_context_message
from pipeline.latents.reader import (
    EpochOrder,
    ShardReader,
    draw_eps,
    load_manifest,
    load_npy,
    sample_z,
)

STATE_FORMAT = "ldm-pipeline/latent-loader"
# State keys that must match on resume: the batches depend on them.
ORDER_KEYS = ("seed", "batch_size", "shuffle", "shuffle_window_shards", "drop_last", "world_size", "rank",
              "num_samples")


@dataclass
class LatentDataConfig:
    path: str = ""                     # latent folder: manifest.json + shards (jobs.precompute)
    batch_size: int = 8                # per rank
    num_workers: int = 2               # DataLoader worker processes per rank (0: read in the main process)
    seed: int = 0
    shuffle: bool = True
    shuffle_window_shards: int = 256   # shuffle within windows of this many shards; 0 = full shuffle
    drop_last: bool = True             # equal full batches on every rank; False pads ranks and ends short
    use_tokens: bool = False           # batch["tokens"] from KEY.tokens.npy (trained text encoder)
    use_context: bool = False          # batch["context"] from KEY.context.npy (frozen text encoder)
    label_key: str | None = None       # batch["label"] from this key of KEY.json (class-conditional models)
    classes_file: str | None = None    # or batch["label"] = line of the caption in this classes.txt (with
    #                                    label_key too: the line of KEY.json[label_key], a class name such as a synset)
    condition: str | None = None       # batch["concat"]: sr-bicubic | sr-bsr | inpainting | semantic (pipeline.conditions)
    masks: str = "train-256"           # inpainting: the mask setting (pipeline.conditions.masks.MASK_SETTINGS)
    scale_factor: float | None = None  # None: the manifest's (App. G)
    prefetch_factor: int = 2           # batches each worker keeps ready
    pin_memory: bool = False

    def __post_init__(self):
        checks = [(bool(self.path), "data.path must be set to a latent folder (manifest.json + shards)"),
                  (self.batch_size > 0, f"data.batch_size must be positive, got {self.batch_size}"),
                  (self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}"),
                  (self.shuffle_window_shards >= 0,
                   f"data.shuffle_window_shards must be >= 0 (0 = full shuffle), got {self.shuffle_window_shards}"),
                  (self.scale_factor is None or self.scale_factor > 0,
                   f"data.scale_factor must be positive or null (use the manifest's), got {self.scale_factor}"),
                  (self.prefetch_factor > 0, f"data.prefetch_factor must be positive, got {self.prefetch_factor}"),
                  (self.condition in (None, *CONDITIONS),
                   f"data.condition={self.condition!r}: use null or one of {CONDITIONS}"),
                  (self.masks in MASK_SETTINGS, f"data.masks={self.masks!r}: use one of {sorted(MASK_SETTINGS)}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def use_labels(self) -> bool:
        return bool(self.label_key or self.classes_file)


def read_classes(path: str) -> list[str]:
    """Class names of a classes.txt, one per line: line i (from 0) names class i."""
    if not Path(path).is_file():
        raise ValueError(f"data.classes_file={path!r} does not exist: point it at a text file with one class "
                         "name per line (line i names class i)")
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    blank = [i for i, name in enumerate(names) if not name]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if blank or duplicates:
        raise ValueError(f"data.classes_file={path!r}: blank lines {blank} / repeated names {duplicates}; "
                         "each line must name one class, once")
    return names


@dataclass(frozen=True)
class RankPlan:
    """Which epoch positions belong to one rank, and how they form batches."""
    num_samples: int
    rank: int
    world_size: int
    batch_size: int
    drop_last: bool

    @property
    def samples_per_epoch(self) -> int:
        if self.drop_last:  # every rank the same number of full batches: collectives never wait
            return self.num_samples // self.world_size // self.batch_size * self.batch_size
        return math.ceil(self.num_samples / self.world_size)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def positions(self, batch_in_epoch: int) -> np.ndarray:
        """Epoch positions of one batch. Each rank owns a contiguous block of the epoch order, so
        with shuffle windows a rank reads (and indexes) only about 1/world_size of the shards;
        without drop_last the last rank's block wraps around to the start."""
        start = batch_in_epoch * self.batch_size
        local = np.arange(start, min(start + self.batch_size, self.samples_per_epoch), dtype=np.int64)
        return (self.rank * self.samples_per_epoch + local) % self.num_samples


class LatentBatches(IterableDataset):
    """Infinite stream of one rank's batches from batch `start_batch` on, split over workers."""

    def __init__(self, cfg: LatentDataConfig, manifest: dict, plan: RankPlan, start_batch: int,
                 classes: list[str] | None = None):
        super().__init__()
        self.cfg, self.manifest, self.plan, self.start_batch = cfg, manifest, plan, start_batch
        self.counts = [shard["count"] for shard in manifest["shards"]]
        self.scale_factor = cfg.scale_factor if cfg.scale_factor is not None else manifest["scale_factor"]
        self.class_index = None if classes is None else {name: i for i, name in enumerate(classes)}
        self.exts = ("latent.npy", "txt") + ("tokens.npy",) * cfg.use_tokens + ("context.npy",) * cfg.use_context
        self.exts += ("json",) * bool(cfg.label_key)
        self.exts += CONDITION_FILES[cfg.condition] if cfg.condition else ()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(Path(self.cfg.path), self.manifest, self.exts, self.exts)
        orders: dict[int, EpochOrder] = {}
        try:
            for k in count(self.start_batch + worker, num_workers):
                yield self.batch(k, reader, orders)
        finally:
            reader.close()

    def batch(self, k: int, reader: ShardReader, orders: dict[int, EpochOrder]) -> dict:
        """Batch k of this rank (k counts across epochs)."""
        epoch, batch_in_epoch = divmod(k, self.plan.batches_per_epoch)
        if epoch not in orders:
            orders.clear()  # a worker moves through epochs in order: keep one
            orders[epoch] = EpochOrder(self.counts, self.cfg.seed, epoch, self.cfg.shuffle,
                                       self.cfg.shuffle_window_shards)
        order = orders[epoch]
        sample_ids = order.ids(self.plan.positions(batch_in_epoch))
        shards, offsets = order.locate(sample_ids)
        samples = [self.sample(reader, int(s), int(o), epoch, int(i)) for s, o, i in zip(shards, offsets, sample_ids)]
        return self.collate(samples, sample_ids, epoch)

    def sample(self, reader: ShardReader, shard: int, offset: int, epoch: int, sample_id: int) -> dict:
        key, files = reader.read(shard, offset)
        out = {"stored": load_npy(files["latent.npy"]), "caption": files["txt"].decode("utf-8"), "key": key}
        self.check_shape(out["stored"], key, shard)
        if self.cfg.use_tokens:
            out["tokens"] = load_npy(files["tokens.npy"])
        if self.cfg.use_context:
            out["context"] = load_npy(files["context.npy"])
        if self.cfg.use_labels:
            out["label"] = self.label(files, out["caption"], f"{reader.names[shard]}: sample {key!r}")
        if self.cfg.condition:
            out["concat"] = make_condition(self.cfg.condition, files, condition_rng(self.cfg.seed, epoch, sample_id),
                                           f"{reader.names[shard]}: sample {key!r}", self.cfg.masks,
                                           (self.manifest.get("images") or {}).get("map_classes"))
        return out

    def label(self, files: dict[str, bytes], caption: str, where: str) -> int:
        """The class index y of a sample: its metadata's label_key (an index, or with classes_file a name
        looked up there), else its caption's line in classes.txt."""
        meta = json.loads(files["json"]) if self.cfg.label_key else None
        value = meta.get(self.cfg.label_key) if isinstance(meta, dict) else None
        if self.class_index is not None:
            name, what = (caption.strip(), "caption") if not self.cfg.label_key else (
                str(value).strip(), f"metadata {self.cfg.label_key!r}")
            if name not in self.class_index:
                raise ValueError(f"{where} has {what} {name!r}, which is no line of data.classes_file="
                                 f"{self.cfg.classes_file!r}: add it there or read labels with data.label_key")
            return self.class_index[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: its metadata (KEY.json) has {value!r} under data.label_key="
                             f"{self.cfg.label_key!r}, not a class index >= 0; set data.label_key to the key that "
                             f"holds the class, or use data.classes_file")
        return value

    def check_shape(self, stored: np.ndarray, key: str, shard: int) -> None:
        channels, *size = self.manifest["latent_shape"]
        channels *= 2 if self.manifest["storage"] == "moments" else 1
        if list(stored.shape) != [channels, *size]:
            raise ValueError(f"{self.manifest['shards'][shard]['name']}: sample {key!r} has shape "
                             f"{list(stored.shape)}, the manifest's latent_shape implies {[channels, *size]}; "
                             f"rerun jobs.precompute")

    def collate(self, samples: list[dict], sample_ids: np.ndarray, epoch: int) -> dict:
        """z `[B, C, h, w]` float32, caption and key lists, sample_id `[B]`; tokens `[B, L]` int64,
        context `[B, L, D]` float32, label `[B]` int64 and concat `[B, C, h, w]` float32 when configured."""
        stored = torch.from_numpy(np.stack([s["stored"] for s in samples]))
        eps = None
        if self.manifest["storage"] == "moments":
            eps = draw_eps(self.cfg.seed, epoch, sample_ids, tuple(self.manifest["latent_shape"]))
        batch = {"z": sample_z(stored, self.manifest["storage"], eps, self.scale_factor),
                 "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples],
                 "sample_id": torch.from_numpy(sample_ids.copy())}
        for name, dtype in (("tokens", torch.int64), ("context", torch.float32), ("concat", torch.float32)):
            if name in samples[0]:
                shapes = {s[name].shape for s in samples}
                if len(shapes) > 1:
                    raise ValueError(f"{name}.npy shapes differ within a batch ({sorted(shapes)}); "
                                     f"precompute must pad {name} to one length")
                batch[name] = torch.from_numpy(np.stack([s[name] for s in samples])).to(dtype)
        if self.cfg.use_labels:
            batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
        return batch


class LatentLoader:
    """One rank's infinite, resumable iterator of latent batches.

    `rank` and `world_size` come from the caller (the training job); nothing here talks to
    torch.distributed. Each rank saves its own `state_dict()` in the checkpoint.
    """

    def __init__(self, cfg: LatentDataConfig, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest = load_manifest(cfg.path)
        self._check_manifest_has_fields()
        self.classes = read_classes(cfg.classes_file) if cfg.classes_file else None
        self.plan = RankPlan(self.manifest["num_samples"], rank, world_size, cfg.batch_size, cfg.drop_last)
        if self.plan.batches_per_epoch == 0:
            raise ValueError(f"{cfg.path} has {self.plan.num_samples} samples, fewer than world_size x "
                             f"data.batch_size = {world_size} x {cfg.batch_size}: lower data.batch_size, "
                             f"use fewer ranks, or set data.drop_last=false")
        self.batches_consumed = 0
        self._generation = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.batches_consumed // self.plan.batches_per_epoch

    def check_compatible(self, *, latent_channels: int, latent_size: int | tuple,
                         encoder_sha256: str | None = None, context_dim: int | None = None) -> None:
        """ValueError unless the latents fit the model (channels, size, the width of a stored context
        it reads) and, if given, the encoder (pipeline.latents.manifest.check_compatible); the job calls
        it before training."""
        check_compatible(self.manifest, latent_channels=latent_channels, latent_size=latent_size,
                         encoder_sha256=encoder_sha256, context_dim=context_dim)

    def null_context(self) -> torch.Tensor:
        """The stored context of the empty caption [L, D] float32: classifier-free guidance's null condition."""
        path = Path(self.cfg.path) / self.manifest["text_encoder"]["null_context"]
        if not path.is_file():
            raise ValueError(f"{path} is missing: rerun jobs.precompute (it writes the file before any shard)")
        return torch.from_numpy(load_npy(path.read_bytes()).astype(np.float32))

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on, forever. A newer `iter()` or `load_state_dict()`
        supersedes this iterator."""
        self._generation += 1
        return self._batches(self._generation, self.batches_consumed)

    def _batches(self, generation: int, start_batch: int) -> Iterator[dict]:
        source = self._source(LatentBatches(self.cfg, self.manifest, self.plan, start_batch, self.classes))
        try:
            for batch in source:
                if generation != self._generation:
                    raise RuntimeError("this loader iterator was superseded by a newer iter(loader) or "
                                       "load_state_dict(); iterate the new one")
                self.batches_consumed += 1
                yield batch
        finally:
            del source  # shuts the workers down

    def _source(self, dataset: LatentBatches) -> Iterator[dict]:
        if self.cfg.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor, pin_memory=self.cfg.pin_memory,
                               in_order=True))

    def state_dict(self) -> dict:
        """Position of this rank: batches the caller consumed, as (epoch, batch in epoch) too.

        Worker w of W resumes at batch `batches_consumed + w` (module docstring), so this count is
        the position of every worker as well; `num_workers` may differ on resume.
        """
        epoch, batch_in_epoch = divmod(self.batches_consumed, self.plan.batches_per_epoch)
        return {"format": STATE_FORMAT, "version": 1, **self._order_state(),
                "batches_consumed": self.batches_consumed, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "samples_consumed": self._samples_consumed(epoch, batch_in_epoch)}

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the last batch consumed when `state` was taken; iterators made
        before this call stop."""
        if state.get("format") != STATE_FORMAT or state.get("version") != 1:
            raise ValueError(f"not a latent loader state (format {state.get('format')!r}); "
                             f"pass what LatentLoader.state_dict() returned")
        mine = self._order_state()
        for key in ORDER_KEYS:
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume exactly: the checkpoint's data position has {key}="
                                 f"{state[key]!r}, this run {key}={mine[key]!r}; resume with the same "
                                 f"{key} or start a fresh run")
        self.batches_consumed = int(state["batches_consumed"])
        self._generation += 1

    def _order_state(self) -> dict:
        cfg = self.cfg
        return {"seed": cfg.seed, "batch_size": cfg.batch_size, "shuffle": cfg.shuffle,
                "shuffle_window_shards": cfg.shuffle_window_shards, "drop_last": cfg.drop_last,
                "world_size": self.world_size, "rank": self.rank, "num_samples": self.plan.num_samples}

    def _samples_consumed(self, epoch: int, batch_in_epoch: int) -> int:
        in_epoch = min(batch_in_epoch * self.cfg.batch_size, self.plan.samples_per_epoch)
        return epoch * self.plan.samples_per_epoch + in_epoch

    def _check_manifest_has_fields(self) -> None:
        if self.cfg.scale_factor is None and self.manifest.get("scale_factor") is None:
            raise ValueError(f"{self.cfg.path}/manifest.json has no scale_factor: set data.scale_factor "
                             f"or rerun jobs.precompute with scale estimation (App. G)")
        if self.cfg.use_tokens and self.manifest.get("tokenizer") is None:
            raise ValueError(f"data.use_tokens=true but {self.cfg.path} was precomputed without a tokenizer: "
                             f"set data.use_tokens=false or rerun jobs.precompute with a tokenizer")
        if self.cfg.use_context and self.manifest.get("text_encoder") is None:
            raise ValueError("data.use_context=true but " + missing_context_message(self.cfg.path))
        images = self.manifest.get("images") or {}
        if self.cfg.condition == "semantic":
            if not images.get("map_classes"):
                raise ValueError(f"data.condition='semantic' reads each sample's segmentation map, but {self.cfg.path} "
                                 "was precomputed without them: ingest with map_col=, then rerun jobs.precompute "
                                 "with map_classes=N (the maps' class count)")
        elif self.cfg.condition and not images.get("keep_images"):
            raise ValueError(f"data.condition={self.cfg.condition!r} is made from each sample's image, but "
                             f"{self.cfg.path} was precomputed without them: rerun jobs.precompute with "
                             f"keep_images=true")
