"""Random access into latent shards (formats.md "Latent shards"): the manifest, an index of tar
member offsets per shard, positional reads, decoding, and the deterministic order of sample ids.

A sample's global id is its position in the manifest: `shard_start[shard] + offset`. Reading by id
lets the loader shard at sample level (any number of shards works for any ranks x workers) and
resume at an exact sample. Reads are `os.pread` on plain (uncompressed) tars, so a sample costs a
few small reads of the bytes it needs and nothing else.
"""
import io
import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm.autoencoder.model import DiagonalGaussian
from pipeline.latents.manifest import STORAGE_KINDS, read_manifest

# Streams of the per-epoch generators; distinct so that orders and eps draws are independent.
SHARD_ORDER_STREAM, WINDOW_STREAM, EPS_STREAM = 0, 1, 2
MAX_OPEN_SHARDS = 64      # file descriptors kept per process
MAX_CACHED_INDEXES = 4096  # shard indexes kept per process (a few KiB each)
TAR_BLOCK = 512


def load_manifest(folder: str | Path) -> dict:
    """manifest.json of a latent folder (pipeline.latents.manifest), checked for what the loader relies on."""
    manifest = read_manifest(folder)
    path = Path(folder) / "manifest.json"
    if manifest.get("storage") not in STORAGE_KINDS:
        raise ValueError(f"{path}: storage must be one of {STORAGE_KINDS}, got {manifest.get('storage')!r}")
    counts = [shard["count"] for shard in manifest["shards"]]
    if sum(counts) != manifest["num_samples"]:
        raise ValueError(f"{path}: shard counts add up to {sum(counts)}, num_samples says "
                         f"{manifest['num_samples']}; the manifest is inconsistent, rerun jobs.precompute")
    return manifest


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's files lie in one tar: `spans[ext]` is `[count, 2]` (offset, size), -1 if absent."""
    keys: list[str]
    spans: dict[str, np.ndarray]


def scan_tar(fd: int, path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in an uncompressed tar, reading only the
    512-byte headers (several times faster than tarfile; every worker indexes the shards it
    reads). Handles ustar prefixes, pax `path`/`size` records and GNU long names."""
    position, file_size, override = 0, os.fstat(fd).st_size, {}
    while True:
        header = os.pread(fd, TAR_BLOCK, position)
        if len(header) < TAR_BLOCK or header == bytes(TAR_BLOCK):
            if len(header) < TAR_BLOCK and position < file_size:
                raise ValueError(f"{path} is truncated inside a tar header; rerun jobs.precompute")
            return
        if sum(header) - sum(header[148:156]) + 8 * ord(" ") != _tar_number(header[148:156]):
            raise ValueError(f"{path}: bad tar header checksum at byte {position}; the shard is corrupt")
        size, kind, data = _tar_number(header[124:136]), header[156:157], position + TAR_BLOCK
        size = int(override.get("size", size))
        if data + size > file_size:
            raise ValueError(f"{path} is truncated (a member ends past the end of the file); rerun jobs.precompute")
        if kind in (b"x", b"L"):
            override = _tar_extension(kind, os.pread(fd, size, data))
        else:
            if kind in (b"0", b"\0"):
                yield override.get("path") or _tar_name(header), data, size
            override = {}
        position = data + -(-size // TAR_BLOCK) * TAR_BLOCK


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _tar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _tar_extension(kind: bytes, payload: bytes) -> dict[str, str]:
    """The next member's overrides: a GNU long name, or pax records `LEN key=value\\n`."""
    if kind == b"L":
        return {"path": payload.split(b"\0", 1)[0].decode()}
    records, position = {}, 0
    while position < len(payload) and payload[position:position + 1] != b"\0":
        length = int(payload[position:payload.index(b" ", position)])
        key, _, value = payload[payload.index(b" ", position) + 1:position + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        position += length
    return records


def index_shard(path: Path, exts: tuple[str, ...], required: tuple[str, ...]) -> ShardIndex:
    """Record where the members in `exts` lie, grouped by sample key (webdataset: up to the first dot)."""
    keys: list[str] = []
    found: list[dict[str, tuple[int, int]]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, offset, size in scan_tar(fd, path):
            key, _, ext = name.partition(".")
            if ext not in exts:
                continue
            if not keys or keys[-1] != key:
                keys.append(key)
                found.append({})
            found[-1][ext] = (offset, size)
    finally:
        os.close(fd)
    spans = {ext: np.array([f.get(ext, (-1, -1)) for f in found], dtype=np.int64).reshape(-1, 2) for ext in exts}
    for ext in required:
        missing = np.flatnonzero(spans[ext][:, 0] < 0)
        if missing.size:
            raise ValueError(f"{path}: sample {keys[missing[0]]!r} has no .{ext} (needed by the data config)")
    return ShardIndex(keys, spans)


class ShardReader:
    """Reads samples by (shard, offset) through cached file descriptors and shard indexes.

    One per process: create it inside each DataLoader worker (descriptors must not cross a fork).
    """

    def __init__(self, folder: Path, manifest: dict, exts: tuple[str, ...], required: tuple[str, ...]):
        self.folder, self.exts, self.required = folder, exts, required
        self.names = [shard["name"] for shard in manifest["shards"]]
        self.counts = [shard["count"] for shard in manifest["shards"]]
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()

    def read(self, shard: int, offset: int) -> tuple[str, dict[str, bytes]]:
        """(key, {ext: bytes}) of one sample; absent optional members are left out."""
        index, fd = self._index(shard), self._fd(shard)
        files = {}
        for ext in self.exts:
            start, size = index.spans[ext][offset]
            if start >= 0:
                files[ext] = os.pread(fd, int(size), int(start))
                if len(files[ext]) != size:
                    raise ValueError(f"{self.folder / self.names[shard]} is truncated; rerun jobs.precompute")
        return index.keys[offset], files

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, shard: int) -> int:
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        if len(self._fds) >= MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = os.open(self.folder / self.names[shard], os.O_RDONLY)
        return self._fds[shard]

    def _index(self, shard: int) -> ShardIndex:
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        path = self.folder / self.names[shard]
        index = index_shard(path, self.exts, self.required)
        if len(index.keys) != self.counts[shard]:
            raise ValueError(f"{path} holds {len(index.keys)} samples, the manifest says {self.counts[shard]}; "
                             f"the shard changed after precompute, rerun jobs.precompute")
        if len(self._indexes) >= MAX_CACHED_INDEXES:
            self._indexes.popitem(last=False)
        self._indexes[shard] = index
        return index


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """np.load of .npy bytes. Samples of a shard repeat one header, so it is parsed once (numpy
    parses it with ast on every load, which costs more than the read)."""
    if data[6] not in (1, 2):
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    width = 2 if data[6] == 1 else 4
    end = 8 + width + int.from_bytes(data[8:8 + width], "little")
    header = data[:end]
    if header not in _NPY_HEADERS:
        stream = io.BytesIO(header)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
        if dtype.hasobject:
            raise ValueError("a .npy member holds Python objects; latent shards hold plain arrays")
        _NPY_HEADERS[header] = (dtype, shape, "F" if fortran_order else "C", end)
    dtype, shape, order, offset = _NPY_HEADERS[header]
    return np.frombuffer(data, dtype, count=math.prod(shape), offset=offset).reshape(shape, order=order)


def draw_eps(seed: int, epoch: int, sample_ids: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise `[B, *shape]` for the reparameterisation, each row a pure function of
    (seed, epoch, global sample id): a resumed run draws exactly what the uninterrupted one drew,
    whatever the batch, rank or worker the sample lands in."""
    eps = torch.empty((len(sample_ids), *shape))
    generator = torch.Generator()
    for row, sample_id in enumerate(sample_ids.tolist()):
        entropy = np.random.SeedSequence([seed, epoch, sample_id, EPS_STREAM]).generate_state(1, np.uint64)
        generator.manual_seed(int(entropy[0]))
        torch.randn(shape, generator=generator, out=eps[row])
    return eps


def sample_z(stored: torch.Tensor, storage: str, eps: torch.Tensor | None, scale_factor: float) -> torch.Tensor:
    """z the diffusion model sees, float32 `[B, C, h, w]`, from what precompute stored `[B, C', h, w]`.

    KL (`moments` = mean and log-variance stacked on channels): z ~ q(z|x) = N(mean, exp(logvar))
    drawn as mean + std * eps, by the autoencoder's own posterior (same log-variance clamp). VQ
    (`latents`): the pre-quantisation latents as they are. Both times scale_factor (App. G).
    """
    stored = stored.float()
    if storage == "latents":
        return stored * scale_factor
    posterior = DiagonalGaussian(stored)
    return (posterior.mean + posterior.std * eps) * scale_factor


class EpochOrder:
    """The order of global sample ids in one epoch, a pure function of (seed, epoch).

    Shuffled: shards are permuted, cut into windows of `window_shards` consecutive shards (0 = one
    window with every shard, i.e. a full permutation of all samples), and the samples of each window
    are permuted. Windows bound memory to the samples of one window and keep reads local to a few
    shards; with at most `window_shards` shards the shuffle is a full one.
    """

    def __init__(self, counts: list[int], seed: int, epoch: int, shuffle: bool, window_shards: int):
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        order = np.arange(len(counts))
        if shuffle:
            order = np.random.default_rng([seed, epoch, SHARD_ORDER_STREAM]).permutation(len(counts))
        width = window_shards if shuffle and window_shards > 0 else len(counts)
        self.windows = [order[i:i + width] for i in range(0, len(counts), width)]
        sizes = [int(np.take(counts, w).sum()) for w in self.windows]
        self.window_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cached: tuple[int, np.ndarray] | None = None

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Global sample ids at these positions of the epoch (positions in [0, num_samples))."""
        if not self.shuffle:
            return positions.astype(np.int64)
        window_of = np.searchsorted(self.window_starts, positions, side="right") - 1
        out = np.empty(len(positions), dtype=np.int64)
        for window in np.unique(window_of):
            here = window_of == window
            out[here] = self._window_ids(int(window))[positions[here] - self.window_starts[window]]
        return out

    def locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset in shard) of global sample ids."""
        shards = np.searchsorted(self.shard_starts, sample_ids, side="right") - 1
        return shards, sample_ids - self.shard_starts[shards]

    def _window_ids(self, window: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == window:
            return self._cached[1]
        ids = np.concatenate([np.arange(self.shard_starts[s], self.shard_starts[s + 1])
                              for s in self.windows[window]])
        rng = np.random.default_rng([self.seed, self.epoch, WINDOW_STREAM, window])
        self._cached = (window, ids[rng.permutation(len(ids))])
        return self._cached[1]
