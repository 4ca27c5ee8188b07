"""Segmentation maps for semantic synthesis (Sec. 4.3.2): one class-id PNG (`seg.png`) per sample.

The URL list names each row's map (an http(s) URL, or a file path) in `map_col`; img2dataset
carries it into the sample's json. For each sample ingest keeps, the map is fetched, decoded to
8-bit class ids and checked against the image's original size, then resized and cropped by
img2dataset's own `Resizer` with the settings the image had, so map pixel (y, x) labels image pixel
(y, x). Interpolation is nearest (centre-aligned) both ways: any other blends neighbouring ids into a
third id (between class 2 and class 12 lies class 7) all along every boundary. `border` pads the map
with id 255.

Pure of Ray; a failed map comes back as a countable reason, never as an exception.
"""
import http.client
import io
import json
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
from PIL import Image

PNG_COMPRESSION = 9  # class-id maps are small and compress well; the cost is negligible at 256 px
RESIZE_ONLY_IF_BIGGER = False  # img2dataset's default; stage.download() passes this same value


@dataclass(frozen=True)
class MapSettings:
    column: str              # the map column's name in the sample's json (after plan_parts' renames)
    map_dir: str | None      # folder for relative map paths; None: the working directory
    timeout_s: float         # for map URLs, as for image URLs
    image_size: int          # the image's resize settings, as img2dataset had them
    resize_mode: str


class _MapFailure(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def segmentation_png(sample: dict, settings: MapSettings) -> tuple[bytes | None, str | None]:
    """`(png, None)`: the sample's map as a mode "L" PNG the size of its image; `(None, reason)` on failure."""
    meta = json.loads(sample["json"])
    try:
        ids_HW = decode_ids(fetch_map(meta.get(settings.column), settings))
        original = (meta.get("original_height"), meta.get("original_width"))
        if ids_HW.shape != original:
            raise _MapFailure("map_size_mismatch")
        return resize_like_image(ids_HW, settings, (meta.get("height"), meta.get("width"))), None
    except _MapFailure as failure:
        return None, failure.reason


def fetch_map(ref, settings: MapSettings) -> bytes:
    """The map's bytes: an http(s) URL is downloaded, anything else read as a file path."""
    if ref is None or (isinstance(ref, float) and math.isnan(ref)) or not str(ref).strip():
        raise _MapFailure("map_missing")
    ref = str(ref).strip()
    if urlsplit(ref).scheme.lower() in ("http", "https"):
        return _download(ref, settings.timeout_s)
    path = Path(ref)
    if not path.is_absolute() and settings.map_dir is not None:
        path = Path(settings.map_dir) / path
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise _MapFailure("map_missing") from err
    except OSError as err:  # a folder, no permission, an I/O error
        raise _MapFailure("map_download_error") from err


def _download(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise _MapFailure("map_missing" if err.code == 404 else "map_download_error") from err
    except (OSError, http.client.HTTPException, ValueError) as err:  # refused, timed out, cut short, bad URL
        raise _MapFailure("map_download_error") from err


def decode_ids(data: bytes) -> np.ndarray:
    """Class ids, uint8 (H, W): "L" as is, "P" as its palette indices (not its colours), "I;16" / "I"
    where every id fits in 8 bits."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, ids_HW = img.mode, np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _MapFailure("map_decode_error") from err
    if mode in ("L", "P"):
        return ids_HW
    if mode == "I" or mode.startswith("I;16"):
        if ids_HW.size and (ids_HW.min() < 0 or ids_HW.max() > 255):
            raise _MapFailure("map_id_out_of_range")
        return ids_HW.astype(np.uint8)
    raise _MapFailure("map_not_single_channel")


def resize_like_image(ids_HW: np.ndarray, settings: MapSettings, image_hw: tuple) -> bytes:
    """img2dataset's resize and crop of the image (`download()` in pipeline.ingest.stage), with nearest
    interpolation, as PNG; its size must equal the image's (`image_hw`, from the sample's json)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import checks PyPI otherwise
    from img2dataset.resizer import Resizer

    resizer = Resizer(settings.image_size, settings.resize_mode, resize_only_if_bigger=RESIZE_ONLY_IF_BIGGER,
                      upscale_interpolation="nearest", downscale_interpolation="nearest",
                      encode_format="png", encode_quality=PNG_COMPRESSION)
    # OpenCV's INTER_NEAREST samples source pixel floor(x * src / dst), not that under the centre of
    # output pixel x: every boundary lands half an output pixel up-left of the image's (lanczos / area
    # are centre-aligned). INTER_NEAREST_EXACT is centre-aligned; img2dataset has no name for it.
    resizer.upscale_interpolation = resizer.downscale_interpolation = cv2.INTER_NEAREST_EXACT
    png, width, height, _, _, error = resizer(io.BytesIO(_png(ids_HW)))
    if error is not None:
        raise _MapFailure("map_resize_error")
    if (height, width) != tuple(image_hw):
        raise _MapFailure("map_size_mismatch")
    return png


def _png(ids_HW: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(ids_HW).save(buffer, "PNG")
    return buffer.getvalue()
