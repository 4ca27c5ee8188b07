"""The layout demo's scenes and its box detector (`python -m jobs.demo --task layout`).

A layout scene holds one to three shapes (jobs.demo.scenes.Scene objects: shape, colour, quadrant,
size), each in its own quadrant, so that the boxes never overlap; which and how many is a pure function
of (index, seed). Its URL list carries the boxes as the real pipeline's lists do (jobs.url_list): a
`boxes` column holding a JSON list of {"category": the shape's index in SHAPES, "bbox": [x0, y0, w, h]
relative to the picture, "is_group_of": false}, each box the bounding box of the shape's pixels.

`detect_shapes` reads the shapes back from a picture: the pixels far from the border's colour
(jobs/demo/tasks/inpainting.py shape_pixels), split into 4-connected components, each one's class from two
features of the pixels in its bounding box that blur and rounded corners keep: a triangle (apex up) has far
more of them in its bottom quarter than in its top quarter, and a square fills its bounding box's corners
where a circle leaves them mostly empty. The two thresholds were set on the demo autoencoder's
reconstructions of held-out scenes (on the clean scenes any threshold between the classes works).
`box_adherence` is the share of boxes in which it finds a shape of the box's class with IoU >= 0.5.
"""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from jobs.demo.adherence import label_components
from jobs.demo.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene, background, jpeg_bytes, paint_shape, write_parquet
from jobs.demo.tasks.inpainting import shape_pixels
from pipeline.shards import atomic_write_bytes

MAX_SHAPES = 3
MIN_COMPONENT_PIXELS = 6     # smaller specks of a sample are noise, not shapes (a small shape has ~50 at 32 px)
# (bottom quarter - top quarter) / all pixels: a triangle 0.375, a circle or square 0.
TRIANGLE_ASYMMETRY = 0.15
# mean fill of the bounding box's four corner cells (a quarter of its side each): a square 1, a circle 0.32.
SQUARE_CORNERS = 0.6
IOU_MIN = 0.5
# Smaller than a one-shape scene's (jobs.demo.scenes.SIZE_FRACTIONS): a large shape stays inside its quadrant,
# so shapes in neighbouring quadrants never touch (at least 2 px apart at 32 px).
LAYOUT_SIZE_FRACTIONS = {"small": 0.26, "large": 0.38}
LAYOUT_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("width", pa.int32()),
                           ("height", pa.int32()), ("boxes", pa.string()), ("num_objects", pa.int32())])


def layout_scene_for_index(index: int, seed: int) -> tuple[Scene, ...]:
    """1 + index % 3 shapes (so every count is equally common) in distinct quadrants, each of a seeded
    shape, colour and size."""
    if index < 0:
        raise ValueError(f"index={index}: sample indices start at 0")
    rng = np.random.default_rng([seed, index, 2])
    count = 1 + index % MAX_SHAPES
    quadrants = rng.choice(len(POSITIONS), count, replace=False)
    return tuple(Scene(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                       POSITIONS[q], SIZES[rng.integers(len(SIZES))]) for q in sorted(quadrants))


def caption(objects: tuple[Scene, ...]) -> str:
    return " and ".join(o.caption for o in objects)


def _pixel_box(mask_HW: np.ndarray) -> list[float]:
    """[x0, y0, w, h] of the mask's pixels, relative to the canvas."""
    size = mask_HW.shape[0]
    ys, xs = np.nonzero(mask_HW)
    return [xs.min() / size, ys.min() / size, (xs.max() + 1 - xs.min()) / size, (ys.max() + 1 - ys.min()) / size]


def render_layout(objects: tuple[Scene, ...], size: int,
                  rng: np.random.Generator | None = None) -> tuple[Image.Image, list[dict]]:
    """The picture of `objects` (textured and jittered with `rng`, as jobs.demo.scenes.render) and its boxes
    in the URL list's form."""
    canvas_HW3 = background(size, rng)
    boxes = [{"category": SHAPES.index(scene.shape), "is_group_of": False,
              "bbox": _pixel_box(paint_shape(canvas_HW3, scene, rng, LAYOUT_SIZE_FRACTIONS))} for scene in objects]
    return Image.fromarray(np.clip(np.rint(canvas_HW3), 0, 255).astype(np.uint8), "RGB"), boxes


def write_layout_dataset(out_dir: Path, num_images: int, seed: int, image_size: int, held_out: int) -> dict:
    """images/{index:06d}.jpg of every scene, urls.parquet of the first `num_images` (relative urls, see
    jobs.demo.scenes.with_base_url), held_out.parquet and held_out.jsonl (one list of boxes per line, the
    form jobs.sample layouts= reads) of the next `held_out`."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_images + held_out):
        objects = layout_scene_for_index(index, seed)
        image, boxes = render_layout(objects, image_size, np.random.default_rng([seed, index, 3]))
        relative = f"images/{index:06d}.jpg"
        atomic_write_bytes(out_dir / relative, jpeg_bytes(image))
        rows.append({"url": relative, "caption": caption(objects), "width": image_size, "height": image_size,
                     "boxes": json.dumps(boxes), "num_objects": len(objects)})
    write_parquet(out_dir / "urls.parquet", rows[:num_images], LAYOUT_SCHEMA)
    write_parquet(out_dir / "held_out.parquet", rows[num_images:], LAYOUT_SCHEMA)
    atomic_write_bytes(out_dir / "held_out.jsonl", "".join(r["boxes"] + "\n" for r in rows[num_images:]).encode())
    return {"out_dir": str(out_dir), "urls": str(out_dir / "urls.parquet"), "layouts": str(out_dir / "held_out.jsonl"),
            "num_images": num_images, "num_held_out": held_out, "image_size": image_size, "seed": seed,
            "num_boxes": sum(r["num_objects"] for r in rows)}


def read_layouts(path: Path) -> list[list[dict]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def detect_shapes(image) -> list[dict]:
    """[{"category", "bbox" [x0, y0, w, h] relative, "pixels"}] of every shape found in `image` (module doc)."""
    pixels_HW3 = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels_HW = label_components(shape_pixels(pixels_HW3))
    found = []
    for label in np.unique(labels_HW[labels_HW > 0]):
        mask_HW = labels_HW == label
        area = int(mask_HW.sum())
        if area < MIN_COMPONENT_PIXELS:
            continue
        found.append({"category": SHAPES.index(classify_shape(mask_HW)), "bbox": _pixel_box(mask_HW), "pixels": area})
    return found


def classify_shape(mask_HW: np.ndarray) -> str:
    """circle, square or triangle: the class of one component's pixels (module doc)."""
    ys, xs = np.nonzero(mask_HW)
    box_hw = mask_HW[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(float)
    quarter = max(1, round(box_hw.shape[0] / 4))
    if (box_hw[-quarter:].sum() - box_hw[:quarter].sum()) / box_hw.sum() > TRIANGLE_ASYMMETRY:
        return "triangle"
    c = max(1, round(min(box_hw.shape) / 4))
    corners = np.mean([box_hw[:c, :c].mean(), box_hw[:c, -c:].mean(), box_hw[-c:, :c].mean(), box_hw[-c:, -c:].mean()])
    return "square" if corners >= SQUARE_CORNERS else "circle"


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two [x0, y0, w, h] boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def box_hits(found: list[dict], boxes: list[dict]) -> list[bool]:
    """Per box: is there a found shape of its category with IoU >= IOU_MIN."""
    return [any(f["category"] == b["category"] and box_iou(f["bbox"], b["bbox"]) >= IOU_MIN for f in found)
            for b in boxes]


def box_adherence(images: list, layouts: list[list[dict]]) -> float:
    """Share of all boxes of `layouts` (image i's boxes: layouts[i]) that `detect_shapes` finds in image i."""
    hits = [hit for image, boxes in zip(images, layouts, strict=True) for hit in box_hits(detect_shapes(image), boxes)]
    return sum(hits) / len(hits)
