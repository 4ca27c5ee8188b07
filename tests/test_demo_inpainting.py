"""The inpainting demo's scoring (jobs/demo/tasks/inpainting.py): holes over part of the shape, PSNR in the hole,
the mean-colour baseline."""
import numpy as np
import pytest

from jobs.demo.tasks.inpainting import hole_over_shape, mean_colour_fill, psnr_in_hole, shape_pixels
from jobs.demo.scenes import render, scene_for_index


def test_each_hole_covers_part_of_its_scenes_shape_and_not_all_of_it():
    for index in range(24):
        image = np.asarray(render(scene_for_index(index, 0), 32, np.random.default_rng(index)))
        shape = shape_pixels(image)
        hole = hole_over_shape(image, np.random.default_rng(index)).astype(bool)
        assert (hole & shape).any() and (shape & ~hole).any(), index


def test_psnr_counts_only_the_hole_and_the_baseline_fills_it_with_the_visible_mean():
    truth = np.full((1, 4, 4, 3), 100, np.uint8)
    truth[0, 0, 0] = 200
    hole = np.zeros((1, 4, 4), np.uint8)
    hole[0, 2:, 2:] = 1
    off = truth.copy()
    off[0, 0, 0] = 0          # outside the hole: ignored
    off[0, 3, 3] = 110        # one of 4 hole pixels off by 10 in each channel: MSE 25
    assert psnr_in_hole(off, truth, hole)[0] == pytest.approx(10 * np.log10(255.0 ** 2 / 25))
    filled = mean_colour_fill(truth, hole)
    assert (filled[0, 2:, 2:] == round((11 * 100 + 200) / 12)).all() and (filled[0, :2] == truth[0, :2]).all()
