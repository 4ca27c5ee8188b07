"""The semantic demo's scoring (jobs/demo/tasks/semantic.py): IoU of the shape found in a picture with a
scene's map, which separates a scene's own map from another scene's."""
import numpy as np

from jobs.demo.tasks.inpainting import shape_pixels
from jobs.demo.scenes import render_with_map, scene_for_index
from jobs.demo.tasks.semantic import IOU_MARGIN, iou


def test_iou_of_masks():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True          # rows 0-1 vs 1-2: 4 shared of 12
    a[1], b[1] = True, True
    assert np.allclose(iou(a, b), [4 / 12, 1.0, 1.0])  # both empty: 1


def test_the_scenes_own_maps_clear_the_demo_margin_and_other_scenes_do_not():
    """What the check asks of a model, met by the rendered scenes themselves: the detector's shape
    matches the scene's map and not a neighbour's (the order jobs.demo.tasks.semantic shuffles with)."""
    pictures, maps = zip(*(render_with_map(scene_for_index(i, 0), 32, np.random.default_rng(i)) for i in range(48)))
    found = np.stack([shape_pixels(np.asarray(p)) for p in pictures])
    wanted = np.stack(maps) > 0
    own, other = iou(found, wanted).mean(), iou(found, np.roll(wanted, 1, axis=0)).mean()
    assert own > 0.9 and own >= other + IOU_MARGIN + 0.3, (own, other)
