"""The latent folder's `manifest.json`: writing, reading, checking it against a training config.

A latent folder (formats.md) is `NNNNN.tar` shards of per-sample encoder outputs plus this manifest,
which says what made them (encoder identity: config and sha256 of its weights), how (resolution,
crop policy, dtype, storage kind), what is in them (per-shard counts and sha256, skipped samples by
reason) and the latent scale factor of App. G. The training job calls `check_compatible` before
it reads a sample, so latents of another autoencoder or size fail at once, with a message that
says what to change, instead of training a model on the wrong latent space.
"""
import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ldm.autoencoder.model import DiagonalGaussian
from pipeline.conditions.layouts import LAYOUT_COUNTS
from pipeline.shards import atomic_write_json, iter_samples

FORMAT, SCHEMA_VERSION = "ldm-pipeline/latents", 1
MANIFEST_FILE = "manifest.json"
SKIP_REASONS = ("corrupt_image", "missing_caption", "too_small", "truncated_tar", "bad_boxes")
STORAGE_KINDS = ("moments", "latents")  # KL: [mean, logvar] of q(z|x); VQ: pre-quantisation z (App. G)


def build_manifest(*, encoder: dict, resolution: int, crop: str, dtype: str, latent_shape: list[int],
                   scale_factor: float, scale_factor_source: str, shards: list[dict],
                   tokenizer: dict | None, text_encoder: dict | None = None, images: dict | None = None) -> dict:
    """The manifest of formats.md from the per-shard stats (`name, count, sha256, source, skipped`).

    `text_encoder`: None, or the frozen text encoder of KEY.context.npy (pipeline.models.text_encoder
    identity plus "max_length" L and "null_context", the file of the empty caption's context).
    `images`: how the crops were cut and whether KEY.image.png holds them (precompute's image_settings)."""
    storage = "moments" if encoder["kind"] == "kl" else "latents"
    skipped = {reason: sum(s["skipped"].get(reason, 0) for s in shards) for reason in SKIP_REASONS}
    kept = [{k: s[k] for k in ("name", "count", "sha256", "source")} for s in shards if s["count"] > 0]
    layout = None  # layout tokens: the boxes dropped (truncated past max_objects, outside their crop)
    if any("layout" in s for s in shards):
        layout = {name: sum(s.get("layout", {}).get(name, 0) for s in shards) for name in LAYOUT_COUNTS}
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
            "encoder": {k: encoder[k] for k in ("kind", "config", "sha256", "source")},
            "resolution": resolution, "crop": crop, "dtype": dtype, "storage": storage,
            "latent_shape": list(latent_shape), "scale_factor": scale_factor,
            "scale_factor_source": scale_factor_source, "num_samples": sum(s["count"] for s in kept),
            "shards": sorted(kept, key=lambda s: s["name"]), "skipped": skipped, "tokenizer": tokenizer,
            "text_encoder": text_encoder, "images": images, "layout": layout}


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_FILE
    atomic_write_json(path, manifest)
    return path


def read_manifest(latent_dir: str | Path) -> dict:
    """The manifest of a latent folder; ValueError when it is missing or of another format."""
    path = Path(latent_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{latent_dir} has no {MANIFEST_FILE}: point the data path at a folder written by "
                         "`python -m jobs.precompute` (or finish that run: the manifest is written last)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} is format {manifest.get('format')!r} schema {manifest.get('schema_version')!r}; "
                         f"this code reads {FORMAT!r} schema {SCHEMA_VERSION}: re-run jobs.precompute")
    return manifest


def _size_hw(latent_size: int | tuple[int, int] | list[int]) -> list[int]:
    return [latent_size, latent_size] if isinstance(latent_size, int) else list(latent_size)


def check_compatible(manifest: dict, *, latent_channels: int, latent_size: int | tuple[int, int],
                     encoder_sha256: str | None, context_dim: int | None = None) -> None:
    """Raise ValueError naming every difference between the latents and what the training config expects.

    `latent_channels` / `latent_size` are the UNet's input channels and the latent side (or (h, w));
    `encoder_sha256` is the identity of the autoencoder the model will decode with (None: not checked);
    `context_dim` is the UNet's cross-attention width when it reads the stored context (None: not read).
    """
    channels, height, width = manifest["latent_shape"]
    encoder = manifest["encoder"]
    made_by = f"encoder {encoder['source']} ({encoder['kind']}, sha256 {encoder['sha256'][:12]}...)"
    problems = []
    if channels != latent_channels:
        problems.append(f"latent channels: the latents have {channels} ({made_by}), the training config expects "
                        f"{latent_channels}; set the model's latent channels to {channels} or re-run "
                        f"precompute with an autoencoder of embed_dim {latent_channels}")
    if [height, width] != _size_hw(latent_size):
        problems.append(f"latent size: the latents are {height}x{width} (resolution {manifest['resolution']}, "
                        f"{made_by}), the training config expects {'x'.join(map(str, _size_hw(latent_size)))}; "
                        f"set the latent size to {height}x{width} or re-run precompute at the matching resolution")
    if encoder_sha256 is not None and encoder_sha256 != encoder["sha256"]:
        problems.append(f"encoder: the latents were made by {made_by}, the training config's autoencoder has "
                        f"sha256 {encoder_sha256[:12]}...; use that autoencoder or re-run precompute with yours")
    if context_dim is not None:
        problems += _context_problems(manifest.get("text_encoder"), context_dim)
    if problems:
        raise ValueError("latents do not match the training config:\n  " + "\n  ".join(problems))


def missing_context_message(where: str) -> str:
    return (f"{where} was precomputed without a frozen text encoder (no KEY.context.npy): rerun jobs.precompute "
            "with text_encoder.kind=openclip (text_encoder.arch=..., text_encoder.pretrained=...) or "
            "text_encoder.kind=hf_clip (text_encoder.name_or_path=...), or set data.use_context=false")


def _context_problems(text_encoder: dict | None, context_dim: int) -> list[str]:
    if text_encoder is None:
        return ["context: " + missing_context_message("the latent folder")]
    if text_encoder["width"] != context_dim:
        name = text_encoder.get("arch") or text_encoder.get("name_or_path")
        return [f"context width: the stored context is {text_encoder['width']} wide (text encoder "
                f"{text_encoder['kind']} {name}), the UNet's context_dim is {context_dim}; choose a model.preset "
                f"with unet.context_dim={text_encoder['width']} or rerun jobs.precompute with a text encoder of "
                f"width {context_dim}"]
    return []


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def iter_latent_samples(latent_dir: str | Path) -> Iterator[dict]:
    """Every sample of a latent folder in manifest order, decoded: for tests and inspection.

    Yields {"key", "shard", "latent" (np [2C|C, h, w]), "caption", "meta" (dict), "tokens" and "context"
    (np or None)}.
    """
    latent_dir = Path(latent_dir)
    for shard in read_manifest(latent_dir)["shards"]:
        for sample in iter_samples(latent_dir / shard["name"]):
            yield {"key": sample["__key__"], "shard": shard["name"], "latent": _npy(sample["latent.npy"]),
                   "caption": sample["txt"].decode("utf-8"), "meta": json.loads(sample["json"]),
                   "tokens": _npy(sample["tokens.npy"]) if "tokens.npy" in sample else None,
                   "context": _npy(sample["context.npy"]) if "context.npy" in sample else None}


def estimate_scale_factor(latents: Iterable[np.ndarray], storage: str, num_samples: int, seed: int = 0) -> float:
    """App. G: rescale the latent by 1 / (its standard deviation), estimated over `num_samples` samples.

    KL moments are sampled, z = mean + std * eps (as the diffusion model will see them); VQ latents
    are used as stored. One scalar over every element, as in the released models (0.18215 for KL-f8).
    """
    generator = torch.Generator().manual_seed(seed)
    count, total, total_sq = 0, 0.0, 0.0
    for i, latent in enumerate(latents):
        if i >= num_samples:
            break
        z = torch.from_numpy(latent.astype(np.float32))[None]
        if storage == "moments":
            z = DiagonalGaussian(z).sample(generator)
        z = z.double()
        count, total, total_sq = count + z.numel(), total + z.sum().item(), total_sq + z.square().sum().item()
    if count < 2:
        raise ValueError("no latents to estimate the scale factor from; set scale_factor explicitly")
    variance = (total_sq - total * total / count) / (count - 1)
    if variance <= 0:
        raise ValueError("the latents have zero variance; set scale_factor explicitly (App. G)")
    return 1.0 / math.sqrt(variance)
