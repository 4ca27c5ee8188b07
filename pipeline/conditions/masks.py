"""LaMa's inpainting masks (Suvorov et al.), as the LDM inpainting task uses them (Sec. 4.5, App. E.2.2).

LDM makes its masks "with the code of [88]" (LaMa); this is our reimplementation from the description
in PAPER_TASKS.md 2.2 (generators) and 2.1 (eval-set protocol), not LaMa's code. Every number in
`MASK_SETTINGS` is from the table in 2.2: LaMa's eval configs random_{thin,medium,thick}_{256,512}
(Narrow / Medium / Wide in LaMa's README) and its training mix abl-04-256-mh-dist ("train-256",
irregular p=1 and box p=1, so 50/50). Counts and sides follow LaMa's wrapper classes (2.2 off-by-one
note): U{min_times..max_times+1} strokes, box sides U{bbox_min..bbox_max} inclusive.

Which config LDM trained and tested with is unverified (PAPER_TASKS 2.2). Our choice: "train-256" for
training, "thick-256" / "thick-512" for the Tab. 7-style evaluation (its "All samples" baselines match
LaMa's Places-512 "wide" masks: inferred). Masks are uint8 [H, W] with 1 marking the hole; every random choice
comes from the `numpy.random.Generator` passed in, which the loader seeds per (seed, epoch, sample).
"""
import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class IrregularSetting:
    """LaMa's irregular ("line") mask: brush strokes of 1-5 straight segments each."""
    proba: float
    min_times: int
    max_times: int
    max_len: int
    max_width: int
    max_angle: int

    def __post_init__(self):
        if not 0 <= self.min_times <= self.max_times or min(self.max_len, self.max_width, self.max_angle) < 1:
            raise ValueError(f"{self}: need 0 <= min_times <= max_times and max_len, max_width, max_angle >= 1")


@dataclass(frozen=True)
class BoxSetting:
    """LaMa's box mask: axis-aligned rectangles kept `margin` pixels off the borders."""
    proba: float
    min_times: int
    max_times: int
    bbox_min: int
    bbox_max: int
    margin: int

    def __post_init__(self):
        if not (0 <= self.min_times <= self.max_times and 1 <= self.bbox_min <= self.bbox_max):
            raise ValueError(f"{self}: need 0 <= min_times <= max_times and 1 <= bbox_min <= bbox_max")
        if self.margin < 0:
            raise ValueError(f"{self}: margin must be >= 0")


@dataclass(frozen=True)
class MaskSetting:
    irregular: IrregularSetting | None = None
    box: BoxSetting | None = None


MASK_SETTINGS: dict[str, MaskSetting] = {
    "thin-256": MaskSetting(IrregularSetting(1.0, 4, 50, 40, 10, 4)),
    "medium-256": MaskSetting(IrregularSetting(1.0, 4, 5, 100, 50, 4), BoxSetting(0.3, 1, 5, 10, 50, 0)),
    "thick-256": MaskSetting(IrregularSetting(1.0, 1, 5, 200, 100, 4), BoxSetting(0.3, 1, 3, 30, 150, 10)),
    "thin-512": MaskSetting(IrregularSetting(1.0, 4, 70, 100, 20, 4)),
    "medium-512": MaskSetting(IrregularSetting(1.0, 4, 10, 200, 100, 4), BoxSetting(0.3, 1, 5, 30, 150, 0)),
    "thick-512": MaskSetting(IrregularSetting(1.0, 1, 5, 450, 250, 4), BoxSetting(0.3, 1, 4, 30, 300, 10)),
    "train-256": MaskSetting(IrregularSetting(1.0, 1, 5, 200, 100, 4), BoxSetting(1.0, 1, 4, 30, 150, 10)),
    # Ours, not LaMa's: train-256 shrunk for the 32 px demo scenes (lengths, sides, margin by 1/8, fewer
    # and thinner strokes and boxes, since the generators' +10 length and +5 width do not scale), so the
    # mean hole share at 32 px (0.31 over 400 draws) is near train-256's at 256 px (0.33).
    "train-32": MaskSetting(IrregularSetting(1.0, 1, 4, 25, 6, 4), BoxSetting(1.0, 1, 3, 4, 16, 1)),
}
BIN_EDGES = np.linspace(0, 1, 11)  # LaMa's evaluator's bins; its 0.3, 0.6, 0.7 are 1 ulp above the decimal
BIN_40_50 = 4  # the paper's "40-50% masked" subset (Tab. 7)


def irregular_mask(height: int, width: int, s: IrregularSetting, rng: np.random.Generator) -> np.ndarray:
    """uint8 [height, width], 1 on brush strokes; segment ends are floored to pixels, kept in the image."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for stroke in range(rng.integers(s.min_times, s.max_times + 2)):  # U{min..max+1}: LaMa's off-by-one
        x, y = int(rng.integers(width)), int(rng.integers(height))
        for _ in range(rng.integers(1, 6)):
            angle = 0.01 + rng.integers(s.max_angle)  # whole radians
            if stroke % 2 == 0:
                angle = 2 * math.pi - angle
            length = 10 + rng.integers(s.max_len)
            brush = 5 + int(rng.integers(s.max_width))
            end_x = min(max(math.floor(x + length * math.sin(angle)), 0), width - 1)
            end_y = min(max(math.floor(y + length * math.cos(angle)), 0), height - 1)
            cv2.line(mask, (x, y), (end_x, end_y), 1, brush)
            x, y = end_x, end_y
    return mask


def box_mask(height: int, width: int, s: BoxSetting, rng: np.random.Generator) -> np.ndarray:
    """uint8 [height, width], 1 in boxes; a side range above the room left inside the margins is cut to it."""
    mask = np.zeros((height, width), dtype=np.uint8)
    cap_h, cap_w = height - 2 * s.margin, width - 2 * s.margin
    if min(cap_h, cap_w) < 1:
        raise ValueError(f"a {height}x{width} image leaves no room inside the box margin {s.margin}")
    for _ in range(rng.integers(s.min_times, s.max_times + 1)):
        box_h = int(rng.integers(min(s.bbox_min, cap_h), min(s.bbox_max, cap_h) + 1))
        box_w = int(rng.integers(min(s.bbox_min, cap_w), min(s.bbox_max, cap_w) + 1))
        top = int(rng.integers(s.margin, height - s.margin - box_h + 1))
        left = int(rng.integers(s.margin, width - s.margin - box_w + 1))
        mask[top:top + box_h, left:left + box_w] = 1
    return mask


def choose_generator(setting: str, rng: np.random.Generator) -> str:
    """"irregular" or "box", with probability proportional to the setting's `proba`s (MixedMaskGenerator)."""
    if setting not in MASK_SETTINGS:
        raise ValueError(f"mask setting {setting!r}: use one of {sorted(MASK_SETTINGS)}")
    parts = {name: getattr(MASK_SETTINGS[setting], name) for name in ("irregular", "box")}
    names = [name for name, part in parts.items() if part is not None and part.proba > 0]
    proba = np.array([parts[name].proba for name in names])
    return names[rng.choice(len(names), p=proba / proba.sum())]


def make_mask(setting: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [height, width] in {0, 1} (1 = hole) of one sample, drawn from `setting`."""
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mask {name} must be a positive int, got {size!r}")
    generator = choose_generator(setting, rng)
    if generator == "box":
        return box_mask(height, width, MASK_SETTINGS[setting].box, rng)
    return irregular_mask(height, width, MASK_SETTINGS[setting].irregular, rng)


def eval_mask(setting: str, height: int, width: int, rng: np.random.Generator,
              variants: int = 5, max_area: float = 0.5) -> np.ndarray:
    """One eval-set mask, LaMa's gen_mask_dataset protocol (PAPER_TASKS 2.1 steps 2, 4, 5).

    Draws `variants` candidates, drops those covering more than `max_area`, keeps one of the rest at
    random. Step 3 (square crop around the hole) is left out: our eval images are square crops already.
    Where every candidate is too large we draw again (LaMa's handling of that case is not described).
    """
    if variants < 1 or not 0 < max_area <= 1:
        raise ValueError(f"eval_mask needs variants >= 1 and 0 < max_area <= 1, got {variants}, {max_area}")
    for _ in range(100):
        candidates = [make_mask(setting, height, width, rng) for _ in range(variants)]
        kept = [mask for mask in candidates if mask.mean() <= max_area]
        if kept:
            return kept[rng.integers(len(kept))]
    raise RuntimeError(f"mask setting {setting!r} cannot produce masks under max_area={max_area} "
                       f"at {height}x{width} (100 x {variants} candidates were all larger)")


def area_bin(mask: np.ndarray) -> int:
    """LaMa's evaluator bin (0..9) of a mask's hole fraction: [BIN_EDGES[i], BIN_EDGES[i+1]), 1.0 in bin 9."""
    fraction = np.count_nonzero(mask) / mask.size
    return min(int(np.searchsorted(BIN_EDGES, fraction, side="right")) - 1, 9)
