"""The layout demo's scenes and box detector (jobs/demo/layout_scenes.py): scenes of 1-3 shapes in distinct
quadrants, their boxes in jobs.url_list's form through a real precompute tokenizer, and a detector that finds
every box in the scenes themselves (after JPEG, blur and noise), but few of another scene's."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from jobs.demo.layout_scenes import (
    LAYOUT_SCHEMA,
    box_adherence,
    box_hits,
    box_iou,
    detect_shapes,
    layout_scene_for_index,
    read_layouts,
    render_layout,
    write_layout_dataset,
)
from jobs.demo.scenes import SHAPES
from pipeline.conditions.layouts import LayoutConfig, parse_boxes

NUM = 120


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(images read back from the JPEG files, layouts read back from the URL list) of a written dataset."""
    out = tmp_path_factory.mktemp("layout")
    info = write_layout_dataset(out, NUM, seed=0, image_size=32, held_out=24)
    rows = pq.read_table(out / "urls.parquet").to_pylist()
    images = [Image.open(out / row["url"]).convert("RGB") for row in rows]
    return info, out, images, [json.loads(row["boxes"]) for row in rows]


def test_scenes_hold_one_to_three_shapes_in_distinct_quadrants_deterministically():
    scenes = [layout_scene_for_index(i, 0) for i in range(300)]
    assert [len(s) for s in scenes[:6]] == [1, 2, 3, 1, 2, 3]
    assert all(len({o.position for o in s}) == len(s) for s in scenes)
    assert {o.shape for s in scenes for o in s} == set(SHAPES)
    assert scenes == [layout_scene_for_index(i, 0) for i in range(300)] and scenes != [
        layout_scene_for_index(i, 1) for i in range(300)]
    with pytest.raises(ValueError, match="index=-1"):
        layout_scene_for_index(-1, 0)


def test_boxes_are_the_shapes_pixel_boxes_and_never_overlap():
    for i in range(60):
        _, boxes = render_layout(layout_scene_for_index(i, 0), 32)
        assert [b["category"] for b in boxes] == [SHAPES.index(o.shape) for o in layout_scene_for_index(i, 0)]
        for a in range(len(boxes)):
            x0, y0, w, h = boxes[a]["bbox"]
            assert 0 <= x0 and 0 <= y0 and x0 + w <= 1 and y0 + h <= 1
            assert all(box_iou(boxes[a]["bbox"], boxes[b]["bbox"]) == 0 for b in range(a))


def test_the_url_list_carries_boxes_that_the_precompute_tokenizer_takes(dataset):
    info, out, _, layouts = dataset
    assert pq.read_schema(out / "urls.parquet").equals(LAYOUT_SCHEMA, check_metadata=False)
    assert info["num_images"] == NUM and len(read_layouts(out / "held_out.jsonl")) == 24
    tokenizer = LayoutConfig("boxes", num_classes=len(SHAPES), num_tokens=257).tokenizer
    for boxes in layouts[:10]:
        decoded, _ = tokenizer.decode(tokenizer.encode(parse_boxes(json.dumps(boxes), "test"))[0])
        assert [b.category for b in decoded] == [b["category"] for b in boxes]
        for got, want in zip(decoded, boxes):  # a 16x16 grid: corners within half a cell (1/30)
            np.testing.assert_allclose([got.x0, got.y0, got.x0 + got.w, got.y0 + got.h],
                                       [want["bbox"][0], want["bbox"][1], want["bbox"][0] + want["bbox"][2],
                                        want["bbox"][1] + want["bbox"][3]], atol=1 / 30 + 1e-9)


def test_the_detector_finds_every_box_of_its_own_scenes_and_few_of_another_scenes(dataset):
    _, _, images, layouts = dataset
    assert box_adherence(images, layouts) >= 0.98
    assert box_adherence(images, layouts[1:] + layouts[:1]) <= 0.25


def test_the_detector_survives_blur_and_noise(dataset):
    _, _, images, layouts = dataset
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im.filter(ImageFilter.GaussianBlur(0.6))).astype(float)
                                     + rng.normal(0, 6, (32, 32, 3)), 0, 255).astype(np.uint8)) for im in images]
    assert box_adherence(noisy, layouts) >= 0.9


def test_a_box_needs_its_class_and_half_overlap():
    box = {"category": 1, "bbox": [0.1, 0.1, 0.3, 0.3]}
    assert box_hits([{"category": 1, "bbox": [0.15, 0.1, 0.3, 0.3]}], [box]) == [True]   # IoU 0.71
    assert box_hits([{"category": 0, "bbox": [0.1, 0.1, 0.3, 0.3]}], [box]) == [False]   # another class
    assert box_hits([{"category": 1, "bbox": [0.3, 0.1, 0.3, 0.3]}], [box]) == [False]   # IoU 0.2
    blank = Image.new("RGB", (32, 32), (236, 236, 236))
    assert detect_shapes(blank) == [] and box_adherence([blank], [[box]]) == 0.0
