"""A sample's boxes (its KEY.json) -> the layout tokens of its training crop (App. E.2.1).

The boxes come from the URL list (jobs.url_list: COCO / OpenImages annotations) through ingest into each
sample's metadata under `boxes_key`: a list, or the JSON string of a list, of
{"category": int, "bbox": [x0, y0, w, h] relative to the whole picture, "is_group_of": bool}.

Precompute cuts a square crop of the picture; the layout of that crop follows the conditional builder the
paper's layout models use (shared/PAPER_TASKS.md 3.1): keep the first `max_objects` boxes (the rest are
dropped and counted), shuffle them, drop those that do not overlap the crop (counted), and encode the rest in
whole-picture coordinates with the crop window as the 2 crop tokens. The shuffle is drawn from (seed, sample
id), so a rerun writes the same tokens. Malformed boxes raise ValueError; precompute skips and counts
the sample ("bad_boxes") rather than guessing.
"""
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ldm.diffusion.layout import MAX_OBJECTS, NUM_TOKENS, Box, LayoutTokenizer, box_from_dict

LAYOUT_COUNTS = ("objects_dropped", "boxes_outside_crop")  # per shard and in the manifest


@dataclass
class LayoutConfig:
    """Precompute's `layout`: which KEY.json key holds the boxes (None: no layouts) and the tokenizer they go through."""
    boxes_key: str | None = None     # KEY.json key of each sample's boxes (jobs.url_list: boxes); None: no layouts
    num_classes: int | None = None   # box categories 0..num_classes-1 (the URL list's classes.txt)
    num_tokens: int = NUM_TOKENS     # the shared vocabulary (sets the coordinate grid: int(sqrt(num_tokens)))
    max_objects: int = MAX_OBJECTS   # boxes past this many are dropped and counted

    def __post_init__(self):
        if self.boxes_key is None:
            return
        if self.num_classes is None:
            raise ValueError("layout.boxes_key is set but layout.num_classes is not: set it to the number of box "
                             "categories (the lines of the URL list's classes.txt)")
        self.tokenizer  # noqa: B018 -- checks num_classes, num_tokens and max_objects together

    @property
    def tokenizer(self) -> LayoutTokenizer:
        return LayoutTokenizer(self.num_classes, self.max_objects, self.num_tokens)

    def spec(self) -> dict:
        """The manifest's `tokenizer` entry of layout tokens (KEY.tokens.npy)."""
        return {"kind": "layout", "boxes_key": self.boxes_key, "num_classes": self.num_classes,
                "num_tokens": self.num_tokens, "max_objects": self.max_objects,
                "max_length": self.tokenizer.sequence_length}


def tokenizer_of(spec: dict) -> LayoutTokenizer:
    """The LayoutTokenizer a manifest's (or a model bundle's) `tokenizer` entry names."""
    return LayoutTokenizer(spec["num_classes"], spec["max_objects"], spec["num_tokens"])


def parse_boxes(value, where: str) -> list[Box]:
    """Boxes of one layout: a list of box dicts or its JSON string; ValueError naming `where` otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{where}: the boxes are a string but not JSON ({err})") from err
    if not isinstance(value, list):
        raise ValueError(f"{where}: the boxes must be a list of {{'category', 'bbox'}} dicts, got "
                         f"{type(value).__name__}")
    try:
        return [box_from_dict(b) for b in value]
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _overlaps(box: Box, crop: tuple[float, float, float, float]) -> bool:
    cx0, cy0, cx1, cy1 = crop
    return box.x0 < cx1 and box.x0 + box.w > cx0 and box.y0 < cy1 and box.y0 + box.h > cy0


def _shuffled(boxes: list[Box], seed: int, sample_id: str) -> list[Box]:
    digest = hashlib.sha256(f"{seed}/layout/{sample_id}".encode()).digest()[:8]
    order = np.random.default_rng(int.from_bytes(digest, "little")).permutation(len(boxes))
    return [boxes[i] for i in order]


def layout_tokens(meta: dict, image_size: tuple[int, int], crop: tuple[int, int, int], layout: LayoutConfig,
                  sample_id: str, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """(int32 tokens [max_objects * 3 + 2], LAYOUT_COUNTS) of the crop (left, top, side) in pixels of a
    picture of `image_size` (width, height); the shuffle is drawn from (seed, sample_id). ValueError naming
    the sample for missing or bad boxes."""
    if layout.boxes_key not in meta:
        raise ValueError(f"{sample_id}: KEY.json has no {layout.boxes_key!r} (keys {sorted(meta)}); ingest a URL "
                         f"list with a boxes column (jobs.url_list) or set layout.boxes_key to the key that holds them")
    boxes = parse_boxes(meta[layout.boxes_key], sample_id)
    tokenizer = layout.tokenizer
    tokenizer.encode(boxes)  # checks every box (range, class) before any is dropped
    kept = _shuffled(boxes[:layout.max_objects], seed, sample_id)
    (width, height), (left, top, side) = image_size, crop
    window = (left / width, top / height, (left + side) / width, (top + side) / height)
    inside = [b for b in kept if _overlaps(b, window)]
    tokens, _ = tokenizer.encode(inside, crop=window)
    counts = {"objects_dropped": len(boxes) - len(kept), "boxes_outside_crop": len(kept) - len(inside)}
    return tokens.numpy().astype(np.int32), counts


def read_layout_tokens(folder) -> tuple[list[str], np.ndarray, dict]:
    """(keys, tokens [N, L] int64, the manifest's tokenizer spec) of a latent folder that precompute wrote with
    layout.boxes_key: each sample's stored crop tokens, in manifest order. For the Tab. 9 protocol the folder is
    the centre-cropped validation set, so the crop tokens match the reference images. ValueError for a folder
    without layout tokens."""
    from pipeline.latents.manifest import iter_latent_samples, read_manifest

    spec = read_manifest(folder).get("tokenizer")
    if not spec or spec.get("kind") != "layout":
        raise ValueError(f"layouts={str(folder)!r}: its manifest records no layout tokens (tokenizer {spec}); "
                         "precompute the layouts with layout.boxes_key=..., or give a JSON-lines file of boxes")
    keys, rows = [], []
    for sample in iter_latent_samples(folder):
        if sample["tokens"] is None or sample["tokens"].shape != (spec["max_length"],):
            raise ValueError(f"layouts={str(folder)!r}: sample {sample['key']} holds no {spec['max_length']} layout "
                             "tokens: precompute the folder again")
        keys.append(sample["key"])
        rows.append(sample["tokens"].astype(np.int64))
    if not rows:
        raise ValueError(f"layouts={str(folder)!r} holds no samples")
    return keys, np.stack(rows), spec
