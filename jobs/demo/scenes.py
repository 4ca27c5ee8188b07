"""The embedded demo dataset: synthetic captioned scenes of one coloured shape.

Every image holds ONE shape (circle, square, triangle) of one of six well separated colours, in
one of four quadrants, at one of two sizes, on a light, slightly textured background; its caption
names all four attributes ("a small red circle in the top left"). 3 x 6 x 4 x 2 = 144 captions,
enough for a tiny text-to-image LDM (Sec. 4.3, text-to-image) to learn on CPU in minutes, and
simple enough that `jobs.demo.adherence.detect` can read the attributes back from a sample.

The dataset is written the way the real pipeline receives LAION: a `urls.parquet` of (url,
caption, width, height, similarity, punsafe, map) rows next to the images; `map` names each image's
segmentation map (maps/, class ids of MAP_CLASSES), which ingest copies beside it (map_col=map). The urls are RELATIVE
("images/000012.jpg"); serve `out_dir` over HTTP and call `with_base_url` to make them absolute
before handing the parquet to img2dataset.

Everything is a pure function of (index, seed): image `i` is the same bytes whatever
`num_images` is, and two runs with the same arguments write byte-identical files.
"""

import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.shards import atomic_write_bytes

SHAPES = ("circle", "square", "triangle")
# Saturated, pairwise distinct hues: far from each other AND from the light background, so that
# a grainy sample's colour is still unambiguous.
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 200, 30),
    "magenta": (195, 50, 190),
    "cyan": (30, 180, 200),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
MAP_CLASSES = ("background", *SHAPES)  # the segmentation maps' class ids

# Side of the shape's bounding box as a fraction of the canvas side.
SIZE_FRACTIONS = {"small": 0.32, "large": 0.46}
CANONICAL_BACKGROUND = (236, 236, 236)
_MARGIN_FRACTION = 0.04  # the bounding box keeps this far from the canvas edge
_JITTER_FRACTION = 0.03  # +- uniform jitter of the shape centre
_BACKGROUND_NOISE = 3.0  # per-pixel std of the background texture, in 8-bit levels
_SHAPE_NOISE = 4.0
_JPEG_QUALITY = 95
URL_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("shape", pa.string()), ("colour", pa.string()), ("position", pa.string()),
    ("size", pa.string()), ("similarity", pa.float64()), ("punsafe", pa.float64()), ("map", pa.string()),
])


@dataclass(frozen=True)
class Scene:
    """One shape of one colour in one quadrant at one size."""

    shape: str
    colour: str
    position: str
    size: str

    def __post_init__(self):
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("position", self.position, POSITIONS),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"Scene {name}={value!r}: use one of {allowed}")

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.position}"

    @property
    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "position": self.position,
                "size": self.size}


ALL_SCENES = tuple(
    Scene(shape, colour, position, size)
    for shape, colour, position, size in itertools.product(SHAPES, COLOURS, POSITIONS, SIZES)
)


def scene_for_index(index: int, seed: int) -> Scene:
    """The scene of sample `index`: every block of 144 consecutive indices (starting at a
    multiple of 144) holds each combination exactly once, in a seeded order per block."""
    if index < 0:
        raise ValueError(f"index={index}: sample indices start at 0")
    block, offset = divmod(index, len(ALL_SCENES))
    order = np.random.default_rng([seed, block]).permutation(len(ALL_SCENES))
    return ALL_SCENES[int(order[offset])]


def shape_mask(shape: str, side: float, centre_yx: tuple[float, float], size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` whose bounding box has side `side` pixels and centre
    `centre_yx`; pixel (i, j) is the unit square around (i + 0.5, j + 0.5). The triangle is
    isosceles, apex up, base = height = side (its area centroid lies side / 6 below the centre)."""
    y_H1 = np.arange(size)[:, None] + 0.5 - centre_yx[0]
    x_1W = np.arange(size)[None, :] + 0.5 - centre_yx[1]
    half = side / 2
    if shape == "circle":
        return y_H1**2 + x_1W**2 <= half**2
    if shape == "square":
        return (np.abs(y_H1) <= half) & (np.abs(x_1W) <= half)
    if shape == "triangle":
        depth_H1 = y_H1 + half  # distance below the apex; the width grows 1 px per px of depth
        return (depth_H1 >= 0) & (y_H1 <= half) & (np.abs(x_1W) <= depth_H1 / 2)
    raise ValueError(f"shape={shape!r}: use one of {SHAPES}")


def centroid_below_centre(shape: str, side: float) -> float:
    """How far the area centroid lies below the bounding-box centre (only the triangle's moves)."""
    return side / 6 if shape == "triangle" else 0.0


def shape_centre(
    scene: Scene, size: int, rng: np.random.Generator | None = None
) -> tuple[float, float]:
    """(y, x) of the bounding-box centre: the quadrant centre, jittered, then pulled in so the
    box stays `_MARGIN_FRACTION` inside the canvas (a large shape may cross the centre line a
    little; its centroid stays in its quadrant)."""
    side = SIZE_FRACTIONS[scene.size] * size
    row, col = scene.position.split()
    centre = np.array([0.25 if row == "top" else 0.75, 0.25 if col == "left" else 0.75]) * size
    if rng is not None:
        centre = centre + rng.uniform(-_JITTER_FRACTION, _JITTER_FRACTION, 2) * size
    inset = _MARGIN_FRACTION * size + side / 2
    centre = np.clip(centre, inset, size - inset)
    return float(centre[0]), float(centre[1])


def background(size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A light (size, size, 3) float canvas: a per-image tint, a faint linear gradient and
    per-pixel grain, so the model cannot learn the background as one flat colour."""
    if rng is None:
        return np.broadcast_to(np.array(CANONICAL_BACKGROUND, float), (size, size, 3)).copy()
    tint_3 = rng.uniform(224, 244, 3)
    slope_2 = rng.uniform(-6, 6, 2)
    ramp_HW = np.linspace(-0.5, 0.5, size)
    gradient_HW = slope_2[0] * ramp_HW[:, None] + slope_2[1] * ramp_HW[None, :]
    grain_HW3 = rng.normal(0, _BACKGROUND_NOISE, (size, size, 3))
    return tint_3 + gradient_HW[..., None] + grain_HW3


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """The RGB image of `scene` on a `size` x `size` canvas. With `rng` the background is
    textured, the shape is grainy and slightly tinted and its position is jittered; without it
    the rendering is the canonical, noise-free one."""
    return render_with_map(scene, size, rng)[0]


def render_with_map(scene: Scene, size: int = 64,
                    rng: np.random.Generator | None = None) -> tuple[Image.Image, np.ndarray]:
    """`render`'s image and its segmentation map: uint8 [size, size] class ids, 0 for the background
    and MAP_CLASSES.index(shape) under the shape (semantic synthesis, jobs.demo --task semantic)."""
    if size < 8:
        raise ValueError(f"size={size}: use a canvas of at least 8 pixels")
    canvas_HW3 = background(size, rng)
    mask_HW = paint_shape(canvas_HW3, scene, rng)
    ids_HW = (mask_HW * MAP_CLASSES.index(scene.shape)).astype(np.uint8)
    return Image.fromarray(np.clip(np.rint(canvas_HW3), 0, 255).astype(np.uint8), "RGB"), ids_HW


def paint_shape(canvas_HW3: np.ndarray, scene: Scene, rng: np.random.Generator | None = None,
                sizes: dict[str, float] = SIZE_FRACTIONS) -> np.ndarray:
    """Paint `scene`'s shape into the float canvas (grainy, tinted and jittered with `rng`), its bounding
    box's side `sizes[scene.size]` of the canvas; returns its mask."""
    size = canvas_HW3.shape[0]
    mask_HW = shape_mask(scene.shape, sizes[scene.size] * size, shape_centre(scene, size, rng), size)
    fill_3 = np.array(COLOURS[scene.colour], float)
    if rng is not None:
        fill_3 = fill_3 + rng.uniform(-10, 10, 3)
        fill_N3 = fill_3 + rng.normal(0, _SHAPE_NOISE, (int(mask_HW.sum()), 3))
    else:
        fill_N3 = fill_3
    canvas_HW3[mask_HW] = fill_N3
    return mask_HW


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 1])  # the trailing 1 separates it from the order


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma: at 64 px, 4:2:0 subsampling would smear the colour over the shape's edge.
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _write_sample(out_dir: Path, index: int, seed: int, image_size: int) -> dict:
    """Render, write `images/{index:06d}.jpg` and its map `maps/{index:06d}.png` (class ids, grey PNG)
    and return its urls.parquet row."""
    scene = scene_for_index(index, seed)
    rng = _sample_rng(seed, index)
    relative, map_relative = f"images/{index:06d}.jpg", f"maps/{index:06d}.png"
    image, ids = render_with_map(scene, image_size, rng)
    atomic_write_bytes(out_dir / relative, jpeg_bytes(image))
    buffer = io.BytesIO()
    Image.fromarray(ids).save(buffer, format="PNG")
    atomic_write_bytes(out_dir / map_relative, buffer.getvalue())
    return {
        "url": relative, "map": map_relative, "caption": scene.caption, "width": image_size, "height": image_size,
        **scene.attributes,
        # LAION-like metadata so that filter stages have something to filter on: CLIP
        # similarity spread around the usual 0.28 cut, punsafe near 0.
        "similarity": float(rng.uniform(0.2, 0.4)), "punsafe": float(rng.uniform(0.0, 0.02)),
    }


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema = URL_SCHEMA) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


def write_demo_dataset(
    out_dir, num_images: int, seed: int = 0, image_size: int = 64, held_out: int = 0
) -> dict:
    """Write `num_images` training samples (urls.parquet) and `held_out` further ones
    (held_out.parquet, e.g. FID reference images) under `out_dir`.

    Images go to `out_dir/images/{index:06d}.jpg`; the training rows use indices
    [0, num_images), the held-out rows [num_images, num_images + held_out), so the two never
    share an image. Urls are relative to `out_dir`: see `with_base_url`.
    """
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: write at least one image")
    if held_out < 0:
        raise ValueError(f"held_out={held_out}: use 0 or more held-out images")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}: use at least 8 pixels")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "maps").mkdir(exist_ok=True)
    rows = [_write_sample(out_dir, i, seed, image_size) for i in range(num_images + held_out)]
    write_parquet(out_dir / "urls.parquet", rows[:num_images])
    write_parquet(out_dir / "held_out.parquet", rows[num_images:])
    return {
        "out_dir": str(out_dir), "urls": str(out_dir / "urls.parquet"),
        "held_out_urls": str(out_dir / "held_out.parquet"), "num_images": num_images,
        "num_held_out": held_out, "image_size": image_size, "seed": seed,
        "num_combinations": len(ALL_SCENES),
    }


def with_base_url(parquet_path, base_url: str, out_path) -> Path:
    """Copy `parquet_path` to `out_path` with every relative url prefixed by `base_url` (e.g.
    "http://127.0.0.1:8000" of a server started in the dataset directory)."""
    if not base_url:
        raise ValueError("base_url is empty: pass the HTTP address that serves the dataset dir")
    table = pq.read_table(parquet_path)
    prefix = base_url.rstrip("/") + "/"
    urls = [prefix + url for url in table.column("url").to_pylist()]
    index = table.schema.get_field_index("url")
    table = table.set_column(index, "url", pa.array(urls, pa.string()))
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out_path)
    return out_path
