"""Box tokenizer of the LDM layout-to-image setup (App. E.2.1, Tab. 17: sequence length 92).

The layout condition y is a set of bounding boxes turned into a token sequence that the
transformer tau_theta embeds (the conditional builder of taming-transformers, as LDM uses it).

Token layout. One shared vocabulary of `NUM_TOKENS = 8192` tokens holds classes, coordinates and
padding, without offsets between them:

- coordinates live on an S x S grid, S = int(sqrt(8192)) = 90. A point (x, y) in [0, 1]^2 is the
  token `round(y * 89) * 90 + round(x * 89)`, so coordinate tokens are 0..8099;
- a class token is `category + num_classes * is_group_of`;
- the pad token is `NUM_TOKENS - 1 = 8191`.

Each object is 3 tokens `[class, token(x0, y0), token(x0 + w, y0 + h)]` (top-left, bottom-right).
At most `MAX_OBJECTS = 30` objects are kept (the rest are dropped and counted); empty slots are
`(8191, 8191, 8191)`. The crop window follows as 2 tokens `token(cx0, cy0), token(cx1, cy1)`, so a
sequence is 30 * 3 + 2 = 92 tokens (`SEQUENCE_LENGTH`).

Rounding rule: Python's built-in `round` on the float `v * (S - 1)`, i.e. round half to even
(44.5 -> 44, 45.5 -> 46), the rule the released builder uses. It is applied the same way
everywhere; decoding maps grid index i back to i / (S - 1), so a round trip is exact up to half a
grid cell, 1 / 89 / 2.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

NUM_TOKENS = 8192
MAX_OBJECTS = 30
GRID_SIZE = int(math.sqrt(NUM_TOKENS))  # 90
SEQUENCE_LENGTH = MAX_OBJECTS * 3 + 2  # 92
BOX_TOLERANCE = 1e-6
FULL_CROP = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Box:
    """One object: class id and image-relative box (x0, y0, w, h) inside [0, 1]^2."""
    category: int
    x0: float
    y0: float
    w: float
    h: float
    is_group_of: bool = False


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _box_error(index: int, box: Box) -> str | None:
    """Why box `index` does not lie inside [0, 1]^2, or None."""
    values = (box.x0, box.y0, box.w, box.h)
    if not all(_is_number(v) for v in values):
        return f"box {index} has non-finite or non-numeric coordinates (x0, y0, w, h) = {values}"
    if box.x0 < 0 or box.y0 < 0 or box.w < 0 or box.h < 0:
        return f"box {index} has a negative x0, y0, w or h: (x0, y0, w, h) = {values}"
    if box.x0 + box.w > 1 + BOX_TOLERANCE or box.y0 + box.h > 1 + BOX_TOLERANCE:
        return (f"box {index} reaches past the image: (x0, y0, w, h) = {values} gives "
                f"x0 + w = {box.x0 + box.w}, y0 + h = {box.y0 + box.h} > 1")
    return None


def _check_crop(crop) -> tuple[float, float, float, float]:
    if len(crop) != 4 or not all(_is_number(v) for v in crop):
        raise ValueError(f"crop must be 4 finite numbers (x0, y0, x1, y1), got {crop!r}")
    x0, y0, x1, y1 = (float(v) for v in crop)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"crop (x0, y0, x1, y1) = {tuple(crop)} must satisfy 0 <= x0 < x1 <= 1 and "
                         f"0 <= y0 < y1 <= 1; pass the crop window in image-relative units")
    return x0, y0, x1, y1


@dataclass(frozen=True)
class LayoutTokenizer:
    """Boxes <-> the token sequence of the layout conditioner (see the module docstring)."""
    num_classes: int
    max_objects: int = MAX_OBJECTS
    num_tokens: int = NUM_TOKENS

    def __post_init__(self):
        for name in ("num_classes", "max_objects", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.grid_size < 2:
            raise ValueError(f"num_tokens = {self.num_tokens} gives a {self.grid_size}x{self.grid_size} "
                             f"grid; use num_tokens >= 5 (LDM uses {NUM_TOKENS})")
        if self.grid_size ** 2 > self.pad_token:
            raise ValueError(f"num_tokens = {self.num_tokens} is a perfect square, so the pad token "
                             f"{self.pad_token} is also a coordinate token; use e.g. {NUM_TOKENS}")
        if 2 * self.num_classes > self.pad_token:
            raise ValueError(f"num_classes = {self.num_classes} with the group-of bit needs class tokens up to "
                             f"{2 * self.num_classes - 1}, which reach the pad token {self.pad_token}; "
                             f"use num_classes <= {self.pad_token // 2} or a larger num_tokens")

    @property
    def grid_size(self) -> int:
        return int(math.sqrt(self.num_tokens))

    @property
    def sequence_length(self) -> int:
        return self.max_objects * 3 + 2

    @property
    def pad_token(self) -> int:
        return self.num_tokens - 1

    def coordinate_token(self, x: float, y: float) -> int:
        """Token of the grid point nearest (x, y) in [0, 1]^2 (round half to even)."""
        last = self.grid_size - 1
        x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
        return round(y * last) * self.grid_size + round(x * last)

    def coordinate(self, token: int) -> tuple[float, float]:
        """(x, y) of a coordinate token."""
        last = self.grid_size - 1
        return (token % self.grid_size) / last, (token // self.grid_size) / last

    def class_token(self, box: Box) -> int:
        return int(box.category) + self.num_classes * int(bool(box.is_group_of))

    def _check_box(self, index: int, box: Box) -> None:
        error = _box_error(index, box)
        if error is not None:
            raise ValueError(f"{error}; boxes must be image-relative (x0, y0, w, h) inside [0, 1]^2")
        category = box.category
        if not isinstance(category, numbers.Integral) or isinstance(category, bool) \
                or not 0 <= category < self.num_classes:
            raise ValueError(f"box {index} has category {category!r} outside [0, num_classes = "
                             f"{self.num_classes}); use class ids 0..{self.num_classes - 1}")

    def _object_tokens(self, box: Box) -> list[int]:
        return [self.class_token(box), self.coordinate_token(box.x0, box.y0),
                self.coordinate_token(box.x0 + box.w, box.y0 + box.h)]

    def encode(self, boxes: Sequence[Box], crop: tuple[float, float, float, float] = FULL_CROP
               ) -> tuple[torch.Tensor, int]:
        """-> (tokens int64 [max_objects * 3 + 2], number of objects dropped by truncation)."""
        for index, box in enumerate(boxes):
            self._check_box(index, box)
        cx0, cy0, cx1, cy1 = _check_crop(crop)
        kept = list(boxes)[:self.max_objects]
        tokens = [t for box in kept for t in self._object_tokens(box)]
        tokens += [self.pad_token] * (3 * (self.max_objects - len(kept)))
        tokens += [self.coordinate_token(cx0, cy0), self.coordinate_token(cx1, cy1)]
        return torch.tensor(tokens, dtype=torch.int64), len(boxes) - len(kept)

    def _check_tokens(self, tokens: torch.Tensor) -> list[int]:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.numel() != self.sequence_length:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"decode needs a 1-D tensor of {self.sequence_length} tokens "
                             f"(max_objects * 3 + 2), got {shape}; decode one sequence at a time")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"decode needs integer tokens, got dtype {tokens.dtype}")
        values = tokens.tolist()
        bad = [t for t in values if not 0 <= t < self.num_tokens]
        if bad:
            raise ValueError(f"tokens {bad[:5]} are outside the vocabulary [0, {self.num_tokens})")
        return values

    def _decode_point(self, token: int, what: str) -> tuple[float, float]:
        if token >= self.grid_size ** 2:
            raise ValueError(f"{what} token {token} is not a coordinate token "
                             f"(0..{self.grid_size ** 2 - 1})")
        return self.coordinate(token)

    def _decode_object(self, slot: int, triple: list[int]) -> Box | None:
        """The box in object slot `slot`, or None for a padding slot."""
        if self.pad_token in triple:
            if triple != [self.pad_token] * 3:
                raise ValueError(f"object slot {slot} mixes padding and real tokens: {triple}")
            return None
        cls = triple[0]
        if cls >= 2 * self.num_classes:
            raise ValueError(f"object slot {slot} has class token {cls} >= 2 * num_classes = "
                             f"{2 * self.num_classes}; is num_classes = {self.num_classes} right?")
        x0, y0 = self._decode_point(triple[1], f"object slot {slot} top-left")
        x1, y1 = self._decode_point(triple[2], f"object slot {slot} bottom-right")
        if x1 < x0 or y1 < y0:
            raise ValueError(f"object slot {slot} has its bottom-right corner {(x1, y1)} above or left of "
                             f"its top-left corner {(x0, y0)}")
        return Box(cls % self.num_classes, x0, y0, x1 - x0, y1 - y0, is_group_of=cls >= self.num_classes)

    def decode(self, tokens: torch.Tensor) -> tuple[list[Box], tuple[float, float, float, float]]:
        """Inverse up to the grid quantisation: boxes (padding skipped) and crop (x0, y0, x1, y1)."""
        values = self._check_tokens(tokens)
        boxes = []
        for slot in range(self.max_objects):
            box = self._decode_object(slot, values[3 * slot:3 * slot + 3])
            if box is not None:
                boxes.append(box)
        cx0, cy0 = self._decode_point(values[-2], "crop top-left")
        cx1, cy1 = self._decode_point(values[-1], "crop bottom-right")
        if cx1 < cx0 or cy1 < cy0:
            raise ValueError(f"crop bottom-right {(cx1, cy1)} is above or left of crop top-left {(cx0, cy0)}")
        return boxes, (cx0, cy0, cx1, cy1)


def empty_layout_ids(num_tokens: int = NUM_TOKENS, max_objects: int = MAX_OBJECTS) -> tuple[int, ...]:
    """Tokens of a layout without boxes over the full crop: the empty condition of classifier-free guidance
    (every class count gives the same sequence: padding holds no class token)."""
    return tuple(LayoutTokenizer(1, max_objects, num_tokens).encode([])[0].tolist())


def _require(obj: dict, key: str):
    if key not in obj:
        raise ValueError(f"box dict is missing key {key!r} (has {sorted(obj)}); expected "
                         f'{{"category": int, "bbox": [x0, y0, w, h], "is_group_of": bool (optional)}}')
    return obj[key]


def box_from_dict(obj: dict) -> Box:
    """Box from a sample's JSON: {"category": int, "bbox": [x0, y0, w, h], "is_group_of": bool (optional)}."""
    if not isinstance(obj, dict):
        raise ValueError(f"a box must be a dict with keys 'category' and 'bbox', got {type(obj).__name__}")
    category = _require(obj, "category")
    if not isinstance(category, numbers.Integral) or isinstance(category, bool):
        raise ValueError(f"key 'category' must be an int class id, got {category!r}")
    bbox = _require(obj, "bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise ValueError(f"key 'bbox' must be 4 finite numbers [x0, y0, w, h], got {bbox!r}")
    group = obj.get("is_group_of", False)
    if not isinstance(group, bool) and group not in (0, 1):
        raise ValueError(f"key 'is_group_of' must be a bool, got {group!r}")
    x0, y0, w, h = (float(v) for v in bbox)
    return Box(int(category), x0, y0, w, h, is_group_of=bool(group))
