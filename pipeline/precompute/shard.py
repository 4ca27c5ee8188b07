"""The per-shard core of precompute: one image shard -> one latent shard, pure of Ray.

An image shard (img2dataset layout: KEY.jpg, KEY.txt, KEY.json) is read, each sample decoded,
cropped to a square and resized to the training resolution, and the images go to the frozen
first stage in batches through `encode_chunks`, a function from an iterator of uint8 batches
[B, 3, R, R] to an iterator of encoder outputs in the same order. Tests pass a local one
(`local_encoder`); `pipeline.precompute.stage` passes one that sends the batches to encoder actors.
Captions are tokenized and, with a frozen text encoder, sent the same way (`encode_text`: token
batches [B, L] -> contexts [B, L, D]).

The output is written as `OUT/NAME.tar` under a temp name and renamed (pipeline.shards), then
`OUT/_work/NAME.json` (the shard's stats) marks it finished. Every choice per sample (the random
crop included) is a function of the settings and the sample's key, so a retried or rerun shard
is byte-identical: the rename makes a shard's samples appear exactly once, whoever wrote it.
"""
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.conditions import decode_map
from pipeline.conditions.layouts import LAYOUT_COUNTS, LayoutConfig, layout_tokens
from pipeline.latents.manifest import SKIP_REASONS
from pipeline.shards import atomic_write_json, iter_samples, write_shard

CROPS = ("center", "random")
RESIZE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX}  # BOX: area averaging
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EncodeChunks = Callable[[Iterator[np.ndarray]], Iterator[np.ndarray]]


@dataclass(frozen=True)
class ImagePolicy:
    """How a picture becomes the encoder's input: a square crop, resized to `resolution`.

    The square's side is the shorter side times a fraction in [min_crop_fraction, max_crop_fraction]
    (1, 1: the largest square; the super-resolution sets crop 0.5-1, App. E.3.4), drawn per key.
    `keep_image`: the sample also keeps its crop as KEY.image.png (the HR image of super-resolution,
    the image an inpainting mask is cut from), exactly the pixels the encoder saw.
    `map_classes`: the sample's segmentation map KEY.seg.png (jobs.ingest map_col) is cut by the same
    box, resized by nearest neighbour and kept; each id must be below map_classes (semantic synthesis)."""
    resolution: int
    crop: str = "center"  # "random": the square's offset is drawn from (seed, source shard, key)
    seed: int = 0
    min_crop_fraction: float = 1.0
    max_crop_fraction: float = 1.0
    resize_filter: str = "bicubic"
    keep_image: bool = False
    map_classes: int | None = None

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}: use one of {CROPS}")
        if self.resolution <= 0:
            raise ValueError(f"resolution={self.resolution}: must be a positive number of pixels")
        if not 0 < self.min_crop_fraction <= self.max_crop_fraction <= 1:
            raise ValueError(f"min_crop_fraction={self.min_crop_fraction}, max_crop_fraction="
                             f"{self.max_crop_fraction}: need 0 < min <= max <= 1")
        if self.map_classes is not None and not 2 <= self.map_classes <= 256:
            raise ValueError(f"map_classes={self.map_classes}: a map stores 8-bit ids, so 2..256 classes (or null)")
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"resize_filter={self.resize_filter!r}: use one of {tuple(RESIZE_FILTERS)}")


@dataclass
class Decoded:
    """What the output sample keeps of an input sample (its image goes to the encoder)."""
    key: str
    caption: str
    meta: dict
    image_png: bytes | None = None  # ImagePolicy.keep_image
    map_png: bytes | None = None    # ImagePolicy.map_classes: the cropped map, mode "L"
    tokens: np.ndarray | None = None  # a LayoutConfig: the crop's layout tokens (KEY.tokens.npy)


def shard_paths(out_dir: str | Path, name: str) -> dict[str, Path]:
    """Where shard `name` ("00000.tar") goes and its finished-marker (its stats, written last)."""
    out_dir = Path(out_dir)
    return {"tar": out_dir / name, "stats": out_dir / "_work" / f"{Path(name).stem}.json"}


def read_finished(out_dir: str | Path, name: str) -> dict | None:
    path = shard_paths(out_dir, name)["stats"]
    return json.loads(path.read_text()) if path.is_file() else None


def crop_box(width: int, height: int, policy: ImagePolicy, sample_id: str) -> tuple[int, int, int]:
    """(left, top, side) of the square crop in the picture's pixels."""
    seed = int.from_bytes(hashlib.sha256(f"{policy.seed}/{sample_id}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    side = min(width, height)
    if policy.min_crop_fraction < 1:
        fraction = rng.uniform(policy.min_crop_fraction, policy.max_crop_fraction)
        side = max(1, int(side * fraction))
    if policy.crop == "center":
        return (width - side) // 2, (height - side) // 2, side
    return int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side


def prepare_image(data: bytes, policy: ImagePolicy, sample_id: str) -> tuple[np.ndarray | None, str | None, list]:
    """(uint8 [3, R, R], None, crop box) or (None, skip reason, []). Never raises on bad bytes."""
    size = policy.resolution
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if min(width, height) < size:
            return None, "too_small", []
        left, top, side = crop_box(width, height, policy, sample_id)
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when that still covers the crop: much faster.
        # Not with a map: the rounded draft box would cut the picture up to 4 px off the map's box.
        if not policy.map_classes:
            image.draft("RGB", (-(-size * width // side), -(-size * height // side)))
        scale = image.size[0] / width
        box = tuple(round(v * scale) for v in (left, top, left + side, top + side))
        image = image.convert("RGB").crop(box).resize((size, size), RESIZE_FILTERS[policy.resize_filter])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, "corrupt_image", []
    return np.asarray(image).transpose(2, 0, 1).copy(), None, [left, top, side]


def prepare_map(data: bytes | None, policy: ImagePolicy, box: list, image_size: tuple[int, int],
                where: str) -> bytes:
    """KEY.seg.png of the crop `box` (left, top, side) of a sample's map, resized by nearest neighbour
    (ids stay ids). ValueError naming `where` (shard/key) when the map is missing, not one channel
    of ids, of another size than its image, or holds an id >= map_classes."""
    if data is None:
        raise ValueError(f"{where}: no KEY.seg.png, but map_classes={policy.map_classes} keeps each sample's "
                         "segmentation map: ingest with map_col= (the URL list's map column), or set map_classes=null")
    ids = decode_map(data, policy.map_classes, where)
    if ids.shape[::-1] != image_size:
        raise ValueError(f"{where}: KEY.seg.png is {ids.shape[1]}x{ids.shape[0]}, its image "
                         f"{image_size[0]}x{image_size[1]}: a map must cover its image pixel for pixel")
    left, top, side = box
    size = policy.resolution
    cropped = Image.fromarray(ids).crop((left, top, left + side, top + side))
    buffer = io.BytesIO()
    cropped.resize((size, size), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def _caption(sample: dict, meta: dict) -> str:
    text = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else meta.get("caption") or ""
    return text.strip()


def _meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_sample(sample: dict, policy: ImagePolicy, source: str, layout: LayoutConfig | None = None,
                  layout_counts: dict[str, int] | None = None) -> tuple[Decoded, np.ndarray] | str:
    """(what the output keeps, uint8 image [3, R, R]) of one img2dataset sample, or why it is skipped.
    `layout`: the sample's boxes become its crop's tokens; their drops add to `layout_counts`."""
    meta = _meta(sample)
    caption = _caption(sample, meta)
    if not caption:
        return "missing_caption"
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        return "corrupt_image"
    where = f"{source}/{sample['__key__']}"
    image, reason, box = prepare_image(data, policy, where)
    if reason:
        return reason
    map_png, tokens = None, None
    if policy.map_classes:
        map_png = prepare_map(sample.get("seg.png"), policy, box, Image.open(io.BytesIO(data)).size, where)
    if layout is not None:
        try:
            tokens, counts = layout_tokens(meta, Image.open(io.BytesIO(data)).size, box, layout, where, policy.seed)
        except ValueError:
            return "bad_boxes"
        for name in LAYOUT_COUNTS:
            layout_counts[name] += counts[name]
    meta |= {"source_shard": source, "source_key": sample["__key__"], "crop_box": box}
    return Decoded(sample["__key__"], caption, meta, png_bytes(image) if policy.keep_image else None,
                   map_png, tokens), image


def png_bytes(image_3HW: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_3HW.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def tar_is_complete(path: Path) -> bool:
    """Whether the tar ends with its end-of-archive marker (two zero blocks after the last member).

    A tar cut at a member boundary reads as a shorter, valid archive; only the marker tells.
    """
    try:
        with tarfile.open(path, "r") as tar:
            tar.getmembers()
            end = tar.offset  # where the header after the last member would start
    except (tarfile.TarError, OSError, EOFError):
        return False
    with open(path, "rb") as f:
        f.seek(end)
        return f.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def read_image_samples(path: Path, skipped: dict[str, int]) -> Iterator[dict]:
    """`iter_samples` of an image shard; a truncated tar is counted once and loses its last sample,
    which may lack files (iter_samples drops it where the cut is inside a member; here the cut
    fell on a member boundary)."""
    complete, errors, previous = tar_is_complete(path), {}, None
    for sample in iter_samples(path, errors):
        if previous is not None:
            yield previous
        previous = sample
    if previous is not None and (complete or errors):
        yield previous
    skipped["truncated_tar"] += int(bool(errors) or not complete)


def decoded_batches(path: Path, policy: ImagePolicy, batch_size: int, kept: list[Decoded],
                    skipped: dict[str, int], layout: LayoutConfig | None = None,
                    layout_counts: dict[str, int] | None = None) -> Iterator[np.ndarray]:
    """uint8 image batches [B, 3, R, R] of a shard, lazily; `kept`, `skipped` (and `layout_counts`) fill as it goes."""
    batch = []
    for sample in read_image_samples(path, skipped):
        decoded = decode_sample(sample, policy, path.name, layout, layout_counts)
        if isinstance(decoded, str):
            skipped[decoded] += 1
            continue
        kept.append(decoded[0])
        batch.append(decoded[1])
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


@torch.inference_mode()
def encode_batch(model: torch.nn.Module, images_B3HW: np.ndarray, *, autocast_dtype: torch.dtype | None = None,
                 out_dtype: str = "float16") -> np.ndarray:
    """What precompute stores for a uint8 batch: KL moments [B, 2C, h, w] or VQ latents [B, C, h, w].

    Raw encoder outputs, not scaled: the scale factor (App. G) is applied at load time.
    """
    device = next(model.parameters()).device
    if not images_B3HW.flags.writeable:  # a zero-copy Ray argument; torch wants writable memory
        images_B3HW = images_B3HW.copy()
    x_BCHW = torch.from_numpy(images_B3HW).to(device, non_blocking=True).float().div_(127.5).sub_(1.0)  # [-1, 1]
    if device.type == "cuda":
        x_BCHW = x_BCHW.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        moments = model.encode_moments(x_BCHW)
    return moments.to(getattr(torch, out_dtype)).cpu().numpy()  # cast on the device: half the copy for fp16


@torch.inference_mode()
def encode_text_batch(encoder: torch.nn.Module, tokens_BL: np.ndarray, *,
                      autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """tau_theta(y) of a frozen text encoder for token ids [B, L]: the context [B, L, D] as float16
    (formats.md KEY.context.npy), what the UNet's cross-attention reads (Eq. 3)."""
    device = next(encoder.parameters()).device
    tokens_BL = torch.from_numpy(np.asarray(tokens_BL, dtype=np.int64)).to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        context_BLD = encoder(tokens_BL)
    return context_BLD.to(torch.float16).cpu().numpy()


def local_encoder(model: torch.nn.Module, autocast_dtype: torch.dtype | None = None,
                  out_dtype: str = "float16") -> EncodeChunks:
    """`encode_chunks` that runs `model` in this process."""
    def encode_chunks(chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield encode_batch(model, chunk, autocast_dtype=autocast_dtype, out_dtype=out_dtype)
    return encode_chunks


def local_text_encoder(encoder: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> EncodeChunks:
    """`encode_text` (token chunks [B, L] -> contexts [B, L, D]) that runs `encoder` in this process."""
    def encode_text(chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield encode_text_batch(encoder, chunk, autocast_dtype=autocast_dtype)
    return encode_text


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def latent_samples(kept: list[Decoded], latents: list[np.ndarray], tokens: np.ndarray | None,
                   contexts: list[np.ndarray] | None = None) -> Iterator[dict]:
    """The output shard's samples (formats.md): KEY.latent.npy, KEY.txt, KEY.json [, KEY.tokens.npy]
    [, KEY.context.npy] [, KEY.image.png] [, KEY.seg.png]."""
    for i, (decoded, latent) in enumerate(zip(kept, latents, strict=True)):
        sample = {"__key__": decoded.key, "latent.npy": _npy_bytes(latent), "txt": decoded.caption.encode("utf-8"),
                  "json": json.dumps(decoded.meta, sort_keys=True).encode("utf-8")}
        if tokens is not None:
            sample["tokens.npy"] = _npy_bytes(tokens[i].astype(np.int32))
        if contexts is not None:
            sample["context.npy"] = _npy_bytes(contexts[i])
        if decoded.image_png is not None:
            sample["image.png"] = decoded.image_png
        if decoded.map_png is not None:
            sample["seg.png"] = decoded.map_png
        yield sample


def encode_captions(kept: list[Decoded], tokenize: Callable[[list[str]], torch.Tensor] | None,
                    encode_text: EncodeChunks | None, batch_size: int) -> tuple[np.ndarray | None, list | None]:
    """(tokens [N, L], contexts: N arrays [L, D]) of the kept samples' captions; None where not configured."""
    if tokenize is None or not kept:
        return None, None
    tokens_NL = tokenize([d.caption for d in kept]).numpy()
    if encode_text is None:
        return tokens_NL, None
    chunks = (tokens_NL[i:i + batch_size] for i in range(0, len(tokens_NL), batch_size))
    return tokens_NL, [c for batch in encode_text(chunks) for c in batch]


def process_shard(source: Path, out_dir: Path, policy: ImagePolicy, batch_size: int, encode_chunks: EncodeChunks,
                  tokenize: Callable[[list[str]], torch.Tensor] | None = None,
                  encode_text: EncodeChunks | None = None, layout: LayoutConfig | None = None) -> dict:
    """Encode image shard `source` into `out_dir/<same name>`, mark it finished; returns its stats.

    `encode_text` (needs `tokenize`): token chunks [B, L] -> frozen text encoder contexts [B, L, D].
    `layout` (instead of `tokenize`): KEY.tokens.npy holds each crop's layout tokens; stats["layout"] counts
    the boxes dropped (pipeline.conditions.layouts).
    """
    assert encode_text is None or tokenize is not None, "the text encoder reads the tokenized captions"
    assert layout is None or tokenize is None, "KEY.tokens.npy holds caption tokens or layout tokens"
    start = time.perf_counter()
    kept: list[Decoded] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    layout_counts = dict.fromkeys(LAYOUT_COUNTS, 0)
    batches = decoded_batches(source, policy, batch_size, kept, skipped, layout, layout_counts)
    latents = [z for batch in encode_chunks(batches) for z in batch]
    tokens, contexts = encode_captions(kept, tokenize, encode_text, batch_size)
    if layout is not None and kept:
        tokens = np.stack([d.tokens for d in kept])
    paths = shard_paths(out_dir, source.name)
    stats = {"name": source.name, "source": source.name, "count": len(kept), "skipped": skipped,
             "sha256": None, "bytes": 0}
    if layout is not None:
        stats["layout"] = layout_counts
    paths["stats"].parent.mkdir(parents=True, exist_ok=True)
    if kept:  # an all-skipped shard leaves no tar, only its stats
        write_shard(paths["tar"], latent_samples(kept, latents, tokens, contexts))
        stats |= {"sha256": hashlib.sha256(paths["tar"].read_bytes()).hexdigest(), "bytes": paths["tar"].stat().st_size}
    atomic_write_json(paths["stats"], stats)
    return stats | {"seconds": time.perf_counter() - start}
