"""LaMa's inpainting masks (pipeline.conditions.masks): the settings table, determinism per seed, what
each generator draws (checked on settings small enough to measure), the mix, and the eval protocol."""
import functools

import cv2
import numpy as np
import pytest

from pipeline.conditions import masks
from pipeline.conditions.masks import (BIN_40_50, MASK_SETTINGS, BoxSetting, IrregularSetting, MaskSetting,
                                       area_bin, box_mask, choose_generator, eval_mask, irregular_mask,
                                       make_mask)


def _rngs(num: int):
    return (np.random.default_rng(seed) for seed in range(num))


@functools.cache
def _masks(setting: str, num_seeds: int = 50) -> tuple[np.ndarray, ...]:
    size = int(setting.rsplit("-", 1)[1])
    return tuple(make_mask(setting, size, size, rng) for rng in _rngs(num_seeds))


def test_settings_are_the_table_of_paper_tasks_2_2():
    table = {  # irregular (p, times, max_len, max_width, max_angle); box (p, times, sides, margin)
        "thin-512": ((1, 4, 70, 100, 20, 4), None),
        "medium-512": ((1, 4, 10, 200, 100, 4), (0.3, 1, 5, 30, 150, 0)),
        "thick-512": ((1, 1, 5, 450, 250, 4), (0.3, 1, 4, 30, 300, 10)),
        "thin-256": ((1, 4, 50, 40, 10, 4), None),
        "medium-256": ((1, 4, 5, 100, 50, 4), (0.3, 1, 5, 10, 50, 0)),
        "thick-256": ((1, 1, 5, 200, 100, 4), (0.3, 1, 3, 30, 150, 10)),
        "train-256": ((1, 1, 5, 200, 100, 4), (1, 1, 4, 30, 150, 10)),
    }
    expected = {name: MaskSetting(IrregularSetting(*irregular), box and BoxSetting(*box))
                for name, (irregular, box) in table.items()}
    assert {name: MASK_SETTINGS[name] for name in table} == expected
    assert set(MASK_SETTINGS) - set(table) == {"train-32"}  # ours, for 32 px images (the demo)


@pytest.mark.parametrize("setting", sorted(MASK_SETTINGS))
def test_dtype_shape_values_and_the_same_seed_gives_the_same_mask(setting):
    mask = make_mask(setting, 96, 64, np.random.default_rng(5))
    assert mask.dtype == np.uint8 and mask.shape == (96, 64)
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    np.testing.assert_array_equal(mask, make_mask(setting, 96, 64, np.random.default_rng(5)))
    assert not np.array_equal(mask, make_mask(setting, 96, 64, np.random.default_rng(6)))


@pytest.mark.parametrize("shape", [(32, 256), (256, 32)])
def test_non_square_images_are_covered_along_their_long_side(shape):
    mean = np.mean([make_mask("thin-256", *shape, rng) for rng in _rngs(30)], axis=0)
    along = mean.mean(axis=0) if shape[1] > shape[0] else mean.mean(axis=1)
    first, last = along[:64].mean(), along[-64:].mean()  # strokes start anywhere: no side is favoured
    assert 0.5 < last / first < 2


# ---------------------------------------------------------------------------------------------- boxes


def _one_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the mask's hole, asserting it is one filled rectangle."""
    rows, cols = np.nonzero(mask)
    top, left, bottom, right = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    assert mask[top:bottom, left:right].all() and mask.sum() == (bottom - top) * (right - left)
    return top, left, bottom - top, right - left


def test_a_box_is_one_rectangle_inside_the_margin_with_sides_in_the_inclusive_range():
    s, (height, width) = BoxSetting(1.0, 1, 1, 5, 12, 3), (40, 30)
    boxes = np.array([_one_box(box_mask(height, width, s, rng)) for rng in _rngs(300)])
    top, left, box_h, box_w = boxes.T
    assert top.min() >= 3 and left.min() >= 3
    assert (top + box_h).max() <= height - 3 and (left + box_w).max() <= width - 3
    for sides in (box_h, box_w):
        assert sides.min() == 5 and sides.max() == 12  # both ends of U{bbox_min..bbox_max} occur


def test_box_sides_are_capped_per_axis_by_the_image_less_the_margins():
    s = BoxSetting(1.0, 1, 1, 1, 100, 2)
    boxes = np.array([_one_box(box_mask(20, 30, s, rng)) for rng in _rngs(400)])
    assert boxes[:, 2].max() == 20 - 4 and boxes[:, 3].max() == 30 - 4


def test_the_box_count_is_uniform_over_min_to_max_times_inclusive():
    s = BoxSetting(1.0, 1, 2, 1, 1, 0)  # one-pixel boxes on 10^4 pixels: they almost never coincide
    counts = [int(box_mask(100, 100, s, rng).sum()) for rng in _rngs(100)]
    assert set(counts) == {1, 2}


def test_an_image_too_small_for_the_margin_is_a_value_error():
    with pytest.raises(ValueError, match="margin"):
        box_mask(20, 64, BoxSetting(1.0, 1, 1, 30, 150, 10), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- strokes


def _irregular(s: IrregularSetting, num_seeds: int, size: int = 256) -> list[np.ndarray]:
    return [irregular_mask(size, size, s, rng) for rng in _rngs(num_seeds)]


def test_the_stroke_count_reaches_max_times_plus_one():
    # 10-px vertical segments, brush 5, on 512^2: one stroke is one connected line, and two strokes
    # touch with probability < 1 %, so connected components count the strokes.
    s = IrregularSetting(1.0, 0, 1, max_len=1, max_width=1, max_angle=1)
    counts = [cv2.connectedComponents(mask)[0] - 1 for mask in _irregular(s, 150, size=512)]
    assert set(counts) == {0, 1, 2}  # U{min_times..max_times+1}: LaMa's off-by-one
    assert abs(counts.count(2) / 150 - 1 / 3) < 5 * np.sqrt(2 / 9 / 150)


def test_a_stroke_has_one_to_five_segments_of_length_10_plus_U_max_len():
    s = IrregularSetting(1.0, 0, 0, max_len=1, max_width=1, max_angle=1)  # 0 or 1 vertical strokes
    heights = set()
    for mask in _irregular(s, 120):
        rows, cols = np.nonzero(mask)
        if len(rows) and rows.min() > 0 and rows.max() < 255 and cols.min() > 0 and cols.max() < 255:
            heights.add(int(rows.max() - rows.min()))
    assert len(heights) == 5  # one height per segment count, 1..5
    assert 9 <= np.diff(sorted(heights)).min() and np.diff(sorted(heights)).max() <= 10  # each segment 10 px


def test_the_brush_width_is_5_plus_U_max_width():
    s = IrregularSetting(1.0, 0, 0, max_len=30, max_width=7, max_angle=1)  # vertical strokes, brush 5..11
    rows = [mask.sum(axis=1) for mask in _irregular(s, 200) if mask.any()]
    widest = [int(row.max()) for row in rows]
    # cv2 draws a brush of b px about b + 2 px wide; a joint between segments drifts 1-2 px more.
    assert 13 <= max(widest) <= 11 + 4
    assert 6 <= min(int(np.median(row[row > 0])) for row in rows) <= 7  # some stroke has brush 5 only


def test_the_first_stroke_is_mirrored_so_it_runs_down_and_to_the_left():
    # angle 0.01 or 1.01 rad, mirrored to 2pi - angle for stroke 0: x = start + len sin < start.
    s = IrregularSetting(1.0, 0, 0, max_len=60, max_width=1, max_angle=2)
    covariances = []
    for mask in _irregular(s, 100):
        rows, cols = np.nonzero(mask)
        if len(rows):
            covariances.append(np.cov(cols, rows)[0, 1])
    assert max(covariances) < 1 and np.mean(np.array(covariances) < -10) > 0.5


# ---------------------------------------------------------------------------------------------- the mix


@pytest.mark.parametrize(("setting", "p_box"), [("medium-256", 0.3 / 1.3), ("train-256", 0.5), ("thin-512", 0)])
def test_the_generator_is_chosen_in_proportion_to_the_renormalised_probas(setting, p_box):
    rng, num = np.random.default_rng(0), 1000
    names = [choose_generator(setting, rng) for _ in range(num)]
    assert set(names) <= {"irregular", "box"}
    sigma = np.sqrt(num * p_box * (1 - p_box))
    assert abs(names.count("box") - num * p_box) <= 3.5 * sigma  # 0.3 unnormalised would be 5 sigma out


@pytest.mark.parametrize("generator", ["irregular", "box"])
def test_make_mask_draws_the_chosen_generator(monkeypatch, generator):
    monkeypatch.setattr(masks, "choose_generator", lambda setting, rng: generator)
    s = getattr(MASK_SETTINGS["medium-256"], generator)
    draw = box_mask if generator == "box" else irregular_mask
    np.testing.assert_array_equal(make_mask("medium-256", 64, 80, np.random.default_rng(3)),
                                  draw(64, 80, s, np.random.default_rng(3)))


def test_thick_masks_have_the_widest_strokes_and_the_largest_area():
    # Area alone does not order thin < medium at 256: 4-51 thin strokes cover more than 4-6 medium ones
    # (mean 0.31 vs 0.24). Stroke width does: the share of hole pixels more than 7 px inside the hole.
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))
    area = {kind: np.mean([m.mean() for m in _masks(f"{kind}-256")]) for kind in ("thin", "medium", "thick")}
    core = {kind: np.mean([cv2.erode(m, disk).sum() / max(m.sum(), 1) for m in _masks(f"{kind}-256")])
            for kind in ("thin", "medium", "thick")}
    assert core["thin"] < core["medium"] < core["thick"]
    assert area["thick"] > max(area["thin"], area["medium"])


# ---------------------------------------------------------------------------------------------- eval set


@pytest.mark.parametrize("max_area", [0.5, 0.25])
def test_eval_masks_never_cover_more_than_max_area(max_area):
    fractions = [eval_mask("thick-256", 128, 128, rng, max_area=max_area).mean() for rng in _rngs(20)]
    assert max(fractions) <= max_area and min(fractions) > 0


def test_eval_mask_gives_up_with_a_runtime_error_when_no_candidate_is_small_enough():
    with pytest.raises(RuntimeError, match="cannot produce masks under max_area"):
        eval_mask("medium-256", 16, 16, np.random.default_rng(0), variants=2, max_area=0.03)


@pytest.mark.parametrize(("holes", "expected"), [(0, 0), (39, 3), (40, 4), (45, 4), (49, 4), (50, 5), (99, 9),
                                                 (100, 9)])
def test_area_bins_are_tenths_closed_below_with_1_in_the_last(holes, expected):
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask.flat[:holes] = 1
    assert area_bin(mask) == expected
    assert BIN_40_50 == 4


# ---------------------------------------------------------------------------------------------- errors


def test_an_unknown_setting_names_the_valid_ones():
    with pytest.raises(ValueError) as err:
        make_mask("wide-512", 64, 64, np.random.default_rng(0))
    assert all(name in str(err.value) for name in MASK_SETTINGS)


@pytest.mark.parametrize(("height", "width", "name"),
                         [(0, 64, "height"), (64, -3, "width"), (64.0, 64, "height")])
def test_a_non_positive_or_non_int_size_is_a_value_error_naming_it(height, width, name):
    with pytest.raises(ValueError, match=name):
        make_mask("thick-256", height, width, np.random.default_rng(0))


def test_inconsistent_settings_are_value_errors():
    with pytest.raises(ValueError, match="min_times"):
        IrregularSetting(1.0, 5, 4, 10, 10, 4)
    with pytest.raises(ValueError, match="bbox_min"):
        BoxSetting(1.0, 1, 3, 50, 30, 0)
