"""Spatial conditions made from a latent sample's stored files as the loader reads it (Sec. 4.4-4.5).

A condition is made per (run seed, epoch, sample): the same in every rank, worker and resumed run,
different from epoch to epoch as the paper's data pipelines redraw them. Each kind names the files
it reads and returns float32 [C, h, w] in [-1, 1], concatenated with z_t in the UNet (`concat`).

  sr-bicubic   KEY.image.png (the HR crop) -> its anti-aliased bicubic x4 downsampling (Tab. 5)
  sr-bsr       KEY.image.png -> the light BSR degradation x4 (LDM-BSR, App. D.6.1)
  inpainting   KEY.image.png -> [image, mask] [4, H, W]: the image and a LaMa mask of setting `masks`
               (pipeline.conditions.masks; 1 = fill), at image size: the training step encodes the
               masked image with the frozen first stage on the device (Sec. 4.5), as CompVis' model
               does, so a mask redrawn each epoch costs no stored latent
  semantic     KEY.seg.png (the map precompute cut as its image, map_classes) -> its class ids [1, H, W]
               as float32 (exact below 2^24); the training step one-hots them on the device
               (SemanticOneHot): 182 float maps of 256^2 per sample would be 48 MB through the loader
"""
import io

import numpy as np
from PIL import Image

from pipeline.conditions.degradations import degrade
from pipeline.conditions.masks import make_mask

CONDITIONS = ("sr-bicubic", "sr-bsr", "inpainting", "semantic")
CONDITION_FILES = {"sr-bicubic": ("image.png",), "sr-bsr": ("image.png",), "inpainting": ("image.png",),
                   "semantic": ("seg.png",)}
_STREAM = 0x5E_ED  # keeps the condition's random stream apart from the loader's other draws


def condition_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, sample_id, _STREAM]))


def decode_image(data: bytes, where: str) -> np.ndarray:
    """uint8 [H, W, 3] of a stored KEY.image.png."""
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: KEY.image.png does not decode ({err}); rerun jobs.precompute") from err


def decode_map(data: bytes, num_classes: int, where: str) -> np.ndarray:
    """uint8 [H, W] class ids of a stored KEY.seg.png; ValueError naming `where` for an id >= num_classes."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            ids = np.asarray(opened)  # mode P: the palette indices, which are the ids
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: KEY.seg.png does not decode ({err})") from err
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise ValueError(f"{where}: KEY.seg.png is not a one-channel map of class ids ({opened.mode}): store the "
                         "ids as an 8-bit grey PNG")
    if ids.size and int(ids.max()) >= num_classes:
        raise ValueError(f"{where}: KEY.seg.png holds class id {int(ids.max())}, but {num_classes} classes "
                         f"(0..{num_classes - 1}) are expected: fix the map, or raise the class count "
                         "(precompute's map_classes, the preset's)")
    return ids


def colour_map(ids: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] picture of class ids [...] in fixed colours (id k: the same colour everywhere),
    for sample grids and reports; ids outside 0..255 (the empty map's -1) are black."""
    palette = np.random.default_rng(0x5E6).integers(40, 256, (256, 3), dtype=np.uint8)
    ids = np.asarray(ids).astype(np.int64)
    return np.where(((ids >= 0) & (ids < 256))[..., None], palette[ids.clip(0, 255)], 0).astype(np.uint8)


def make_condition(kind: str, files: dict[str, bytes], rng: np.random.Generator, where: str,
                   masks: str = "train-256", map_classes: int | None = None) -> np.ndarray:
    """The condition [C, h, w] float32 of one sample: images in [-1, 1], an inpainting mask in {0, 1},
    a map's class ids (semantic: each below map_classes)."""
    if kind == "semantic":
        assert map_classes is not None, "a map's ids are checked against its class count"
        return decode_map(files["seg.png"], map_classes, where)[None].astype(np.float32)
    image = decode_image(files["image.png"], where)
    if kind in ("sr-bicubic", "sr-bsr"):
        low_res = degrade(image, kind.removeprefix("sr-"), rng)
        return low_res.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    if kind == "inpainting":
        mask = make_mask(masks, *image.shape[:2], rng)
        return np.concatenate([image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0,
                               mask[None].astype(np.float32)])
    raise ValueError(f"data.condition={kind!r}: use one of {CONDITIONS}")
