"""Caption adherence of the demo: read shape, colour, position and size back from an image.

The demo's text-to-image LDM (Sec. 4.3) draws grainy coloured blobs, so the detector relies on
region statistics, never on single pixels or a fixed fill ratio:

1. the image is resized to a fixed working canvas (any input size works) and box-blurred;
2. the background colour is the median of the border;
3. foreground = colour distance from the background above an Otsu threshold (a statistic of
   this image), reduced to its largest 4-connected component;
4. position = quadrant of the foreground centroid;
5. colour = the palette colour whose direction from the background best matches the median
   foreground colour's (cosine): fading towards the background, as blurry samples do, keeps
   the direction, so a pale red is still red;
6. shape = best normalised correlation with canonical templates of every (shape, size) placed
   on the detected centroid; size = foreground area against the geometric mean of the two
   template areas of that shape (a single area cut cannot work: a large triangle is about as
   big as a small square).

Everything is deterministic numpy.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image

from jobs.demo.scenes import (
    COLOURS,
    SHAPES,
    SIZE_FRACTIONS,
    SIZES,
    Scene,
    centroid_below_centre,
    shape_mask,
)

WORK_SIZE = 64  # detection canvas; inputs are resized to it (bilinear)
_BLUR_RADIUS = 2  # box half-width at WORK_SIZE: a 5x5 mean cuts i.i.d. grain's std by 5x
_BORDER = 2  # border width (pixels at WORK_SIZE) whose median is the background
ATTRIBUTES = ("colour", "shape", "position", "size")


def _working_image(image) -> np.ndarray:
    """(WORK_SIZE, WORK_SIZE, 3) float64 in [0, 1] from a PIL image or an HxWx3 array (uint8,
    or float in [0, 1]: map [-1, 1] model outputs to [0, 1] first)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array of shape {image.shape}: pass H x W x 3 (RGB)")
        if image.dtype != np.uint8:
            image = np.rint(np.clip(image.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)
        image = Image.fromarray(image, "RGB")
    elif not isinstance(image, Image.Image):
        raise ValueError(f"image of type {type(image).__name__}: pass a PIL image or a numpy array")
    image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        image = image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64) / 255.0


def _box_blur(x_HWC: np.ndarray, radius: int) -> np.ndarray:
    """Separable (2r+1)^2 mean with edge replication."""
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0)] * x_HWC.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x_HWC, pad, mode="edge")
        length = x_HWC.shape[axis]
        x_HWC = sum(np.take(padded, range(i, i + length), axis=axis) for i in range(k)) / k
    return x_HWC


def _otsu_threshold(values: np.ndarray, num_bins: int = 128) -> float:
    """The cut maximising the between-class variance of `values` (Otsu, 1979)."""
    counts, edges = np.histogram(values, bins=num_bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1]
    weight_high = values.size - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[1 + int(np.argmax(between))])


def label_components(mask_HW: np.ndarray) -> np.ndarray:
    """int64 [H, W]: 0 off the mask, each 4-connected component of `mask_HW` one positive label (its
    largest pixel index + 1). Each pixel's label spreads to its neighbours until nothing changes."""
    height, width = mask_HW.shape
    padded = np.zeros((height + 2, width + 2), np.int64)  # a zero border: no wrap-around
    labels_HW = padded[1:-1, 1:-1]  # a view: writing it updates `padded`
    labels_HW[...] = np.where(mask_HW, np.arange(1, mask_HW.size + 1).reshape(height, width), 0)
    while True:
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        spread_HW = np.where(mask_HW, np.maximum.reduce([labels_HW, *neighbours]), 0)
        if np.array_equal(spread_HW, labels_HW):
            return labels_HW.copy()
        labels_HW[...] = spread_HW


def _largest_component(mask_HW: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of `mask_HW` (ties: the one of the smallest label)."""
    labels_HW = label_components(mask_HW)
    counts = np.bincount(labels_HW.ravel())
    counts[0] = 0
    return labels_HW == int(np.argmax(counts)) if counts.any() else mask_HW


def _background(smooth_HW3: np.ndarray) -> np.ndarray:
    border = np.ones(smooth_HW3.shape[:2], bool)
    border[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    return np.median(smooth_HW3[border], axis=0)


def _foreground(x_HW3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground mask, background RGB) of a working image."""
    smooth_HW3 = _box_blur(x_HW3, _BLUR_RADIUS)
    bg_3 = _background(smooth_HW3)
    distance_HW = np.linalg.norm(smooth_HW3 - bg_3, axis=-1)
    if np.ptp(distance_HW) < 1e-6:  # a flat image: no foreground; use all of it, deterministic
        return np.ones(distance_HW.shape, bool), bg_3
    return _largest_component(distance_HW > _otsu_threshold(distance_HW)), bg_3


_PALETTE = tuple(COLOURS)
_PALETTE_RGB = np.array([COLOURS[name] for name in _PALETTE], np.float64) / 255.0


def _colour(x_HW3: np.ndarray, mask_HW: np.ndarray, bg_3: np.ndarray) -> str:
    """Palette colour whose departure from the background points the same way (cosine) as the
    median foreground colour's."""
    departure_3 = np.median(x_HW3[mask_HW], axis=0) - bg_3
    palette_P3 = _PALETTE_RGB - bg_3
    cosine_P = palette_P3 @ departure_3 / (
        np.linalg.norm(palette_P3, axis=1) * np.linalg.norm(departure_3) + 1e-12
    )
    return _PALETTE[int(np.argmax(cosine_P))]


def _position(centroid_yx: tuple[float, float]) -> str:
    row = "top" if centroid_yx[0] < WORK_SIZE / 2 else "bottom"
    col = "left" if centroid_yx[1] < WORK_SIZE / 2 else "right"
    return f"{row} {col}"


def _template(shape: str, size: str, centroid_yx: tuple[float, float]) -> np.ndarray:
    """Canonical mask of (shape, size) whose area centroid sits at `centroid_yx`."""
    side = SIZE_FRACTIONS[size] * WORK_SIZE
    centre_yx = (centroid_yx[0] - centroid_below_centre(shape, side), centroid_yx[1])
    return shape_mask(shape, side, centre_yx, WORK_SIZE)


def _correlation(a_HW: np.ndarray, b_HW: np.ndarray) -> float:
    """Normalised (Pearson) correlation of two maps; 0 when one is constant."""
    a = a_HW.ravel() - a_HW.mean()
    b = b_HW.ravel() - b_HW.mean()
    denominator = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denominator) if denominator > 0 else 0.0


def _shape_and_size(mask_HW: np.ndarray, centroid_yx: tuple[float, float]) -> tuple[str, str]:
    mask = mask_HW.astype(np.float64)
    templates = {(s, z): _template(s, z, centroid_yx) for s in SHAPES for z in SIZES}
    score = {key: _correlation(mask, t.astype(np.float64)) for key, t in templates.items()}
    shape = max(SHAPES, key=lambda s: max(score[(s, z)] for z in SIZES))
    small_area, large_area = (templates[(shape, z)].sum() for z in ("small", "large"))
    size = "large" if mask_HW.sum() > np.sqrt(small_area * large_area) else "small"
    return shape, size


def detect(image) -> dict:
    """Attributes (shape, colour, position, size) of the single shape in `image`: a PIL image or
    an H x W x 3 array (uint8, or float in [0, 1]) of any size. Deterministic."""
    x_HW3 = _working_image(image)
    mask_HW, bg_3 = _foreground(x_HW3)
    assert mask_HW.any(), "Otsu cuts below the maximum, so some pixel is foreground"
    ys, xs = np.nonzero(mask_HW)
    centroid_yx = (float(ys.mean()) + 0.5, float(xs.mean()) + 0.5)  # pixel centres
    shape, size = _shape_and_size(mask_HW, centroid_yx)
    return {"shape": shape, "colour": _colour(x_HW3, mask_HW, bg_3),
            "position": _position(centroid_yx), "size": size}


def adherence(images: Sequence, scenes: Sequence[Scene]) -> dict:
    """Share of `images` whose detected attributes match their `scenes` (the captions they were
    generated from): per attribute, `colour_position` (both) and `all` (all four), each in
    [0, 1]."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes: pass one scene per image")
    if not images:
        raise ValueError("no images: pass at least one image to measure adherence")
    hits = {name: [] for name in (*ATTRIBUTES, "colour_position", "all")}
    for image, scene in zip(images, scenes):
        found = detect(image)
        match = {name: found[name] == scene.attributes[name] for name in ATTRIBUTES}
        for name in ATTRIBUTES:
            hits[name].append(match[name])
        hits["colour_position"].append(match["colour"] and match["position"])
        hits["all"].append(all(match.values()))
    return {name: float(np.mean(values)) for name, values in hits.items()}
