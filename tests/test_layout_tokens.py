"""The layout box tokenizer (LDM App. E.2.1): token layout, rounding, padding, truncation, errors."""
import random

import pytest
import torch

from ldm.diffusion.layout import (
    GRID_SIZE, MAX_OBJECTS, NUM_TOKENS, SEQUENCE_LENGTH, Box, LayoutTokenizer, box_from_dict)

HALF_CELL = 1 / 89 / 2 + 1e-6


def random_box(rng: random.Random, num_classes: int) -> Box:
    x0, y0 = rng.random(), rng.random()
    w, h = rng.uniform(0, 1 - x0), rng.uniform(0, 1 - y0)
    return Box(rng.randrange(num_classes), x0, y0, w, h, is_group_of=rng.random() < 0.3)


def test_constants():
    assert (NUM_TOKENS, MAX_OBJECTS, GRID_SIZE, SEQUENCE_LENGTH) == (8192, 30, 90, 92)
    tok = LayoutTokenizer(num_classes=601)
    assert tok.sequence_length == 92 and tok.pad_token == 8191 and tok.grid_size == 90


def test_hand_computed_tokens():
    tok = LayoutTokenizer(num_classes=10)
    tokens, dropped = tok.encode([Box(5, x0=0.25, y0=0.5, w=0.25, h=0.25)])
    # Round half to even: 0.5 * 89 = 44.5 -> 44, 0.25 * 89 = 22.25 -> 22, 0.75 * 89 = 66.75 -> 67.
    top_left = 44 * 90 + 22
    bottom_right = 67 * 90 + 44
    assert (top_left, bottom_right) == (3982, 6074)
    assert dropped == 0
    assert tokens[:3].tolist() == [5, top_left, bottom_right]
    assert tokens[-2:].tolist() == [0, 89 * 90 + 89]  # the full crop (0, 0, 1, 1)


def test_padding_and_length():
    tok = LayoutTokenizer(num_classes=183)
    tokens, dropped = tok.encode([Box(1, 0.1, 0.1, 0.2, 0.2), Box(2, 0.0, 0.0, 1.0, 1.0)])
    assert tokens.dtype == torch.int64 and tokens.shape == (92,) and dropped == 0
    assert tokens[3:6].tolist() == [2, 0, 8099]
    assert tokens[6:90].tolist() == [8191] * 84
    assert int(tokens[:90].max()) == 8191 and int(tokens[90:].max()) <= 8099
    empty, _ = tok.encode([])
    assert empty[:90].tolist() == [8191] * 90
    assert tok.decode(empty) == ([], (0.0, 0.0, 1.0, 1.0))


def test_crop_tokens():
    tok = LayoutTokenizer(num_classes=10)
    tokens, _ = tok.encode([], crop=(0.1, 0.2, 0.6, 0.9))
    assert tokens[-2:].tolist() == [round(0.2 * 89) * 90 + round(0.1 * 89), round(0.9 * 89) * 90 + round(0.6 * 89)]


def test_group_of_bit():
    tok = LayoutTokenizer(num_classes=601)
    tokens, _ = tok.encode([Box(7, 0.1, 0.1, 0.2, 0.2, is_group_of=True), Box(7, 0.1, 0.1, 0.2, 0.2)])
    assert tokens[0].item() == 7 + 601 and tokens[3].item() == 7
    boxes, _ = tok.decode(tokens)
    assert [(b.category, b.is_group_of) for b in boxes] == [(7, True), (7, False)]


def test_round_trip_within_half_cell():
    rng = random.Random(0)
    tok = LayoutTokenizer(num_classes=601)
    for _ in range(50):
        boxes = [random_box(rng, 601) for _ in range(rng.randrange(MAX_OBJECTS + 1))]
        crop = (rng.uniform(0, 0.4), rng.uniform(0, 0.4), rng.uniform(0.6, 1), rng.uniform(0.6, 1))
        tokens, dropped = tok.encode(boxes, crop)
        decoded, decoded_crop = tok.decode(tokens)
        assert dropped == 0 and len(decoded) == len(boxes)
        for box, out in zip(boxes, decoded):
            assert (out.category, out.is_group_of) == (box.category, box.is_group_of)
            corners = (box.x0, box.y0, box.x0 + box.w, box.y0 + box.h)
            out_corners = (out.x0, out.y0, out.x0 + out.w, out.y0 + out.h)
            assert all(abs(a - b) <= HALF_CELL for a, b in zip(corners, out_corners))
        assert all(abs(a - b) <= HALF_CELL for a, b in zip(crop, decoded_crop))
        assert torch.equal(tok.encode(decoded, decoded_crop)[0], tokens)


def test_truncation_counts_dropped():
    tok = LayoutTokenizer(num_classes=10)
    boxes = [Box(i % 10, 0.0, 0.0, 0.5, 0.5) for i in range(33)]
    tokens, dropped = tok.encode(boxes)
    assert dropped == 3 and tokens.shape == (92,)
    assert tokens[0:90:3].tolist() == [i % 10 for i in range(30)]
    assert tok.encode(boxes[:30])[1] == 0
    assert len(tok.decode(tokens)[0]) == 30


def test_smaller_max_objects():
    tok = LayoutTokenizer(num_classes=10, max_objects=2)
    tokens, dropped = tok.encode([Box(1, 0, 0, 1, 1)] * 3)
    assert tok.sequence_length == 8 and tokens.shape == (8,) and dropped == 1


@pytest.mark.parametrize("box, match", [
    (Box(0, -0.1, 0.0, 0.2, 0.2), r"box 1 has a negative x0, y0, w or h: \(x0, y0, w, h\) = \(-0.1"),
    (Box(0, 0.0, -0.1, 0.2, 0.2), "box 1 has a negative"),
    (Box(0, 0.5, 0.0, -0.1, 0.2), "box 1 has a negative"),
    (Box(0, 0.0, 0.5, 0.2, -0.1), "box 1 has a negative"),
    (Box(0, 0.6, 0.0, 0.5, 0.2), r"box 1 reaches past the image: \(x0, y0, w, h\) = \(0.6, 0.0, 0.5, 0.2\)"),
    (Box(0, 0.0, 0.6, 0.2, 0.5), "box 1 reaches past the image"),
    (Box(0, float("nan"), 0.0, 0.2, 0.2), "box 1 has non-finite"),
    (Box(10, 0.0, 0.0, 0.2, 0.2), r"box 1 has category 10 outside \[0, num_classes = 10\)"),
    (Box(-1, 0.0, 0.0, 0.2, 0.2), "box 1 has category -1"),
])
def test_bad_box(box, match):
    tok = LayoutTokenizer(num_classes=10)
    with pytest.raises(ValueError, match=match):
        tok.encode([Box(0, 0.0, 0.0, 0.5, 0.5), box])


def test_box_edge_tolerance():
    tok = LayoutTokenizer(num_classes=10)
    tokens, _ = tok.encode([Box(0, 0.3, 0.3, 0.7 + 5e-7, 0.7 + 5e-7)])
    assert tokens[2].item() == 8099


@pytest.mark.parametrize("crop", [(-0.1, 0, 1, 1), (0, 0, 1.1, 1), (0.5, 0, 0.5, 1), (0, 0.6, 1, 0.4), (0, 0, 1)])
def test_bad_crop(crop):
    with pytest.raises(ValueError, match="crop"):
        LayoutTokenizer(num_classes=10).encode([], crop=crop)


def test_class_tokens_reaching_pad_rejected():
    LayoutTokenizer(num_classes=4095)  # 2 * 4095 = 8190 <= 8191
    with pytest.raises(ValueError, match=r"num_classes = 4096 .* reach the pad token 8191"):
        LayoutTokenizer(num_classes=4096)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        LayoutTokenizer(num_classes=0)
    with pytest.raises(ValueError, match="perfect square"):
        LayoutTokenizer(num_classes=10, num_tokens=8100)


def test_decode_errors():
    tok = LayoutTokenizer(num_classes=10)
    tokens, _ = tok.encode([Box(1, 0.1, 0.1, 0.2, 0.2)])
    with pytest.raises(ValueError, match="1-D tensor of 92 tokens"):
        tok.decode(tokens[:91])
    with pytest.raises(ValueError, match="1-D tensor of 92 tokens"):
        tok.decode(tokens[None])
    with pytest.raises(ValueError, match="integer tokens"):
        tok.decode(tokens.float())
    for bad in (8192, -1):
        t = tokens.clone()
        t[1] = bad
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 8192\)"):
            tok.decode(t)
    t = tokens.clone()
    t[1] = 8100
    with pytest.raises(ValueError, match="top-left token 8100 is not a coordinate token"):
        tok.decode(t)
    t = tokens.clone()
    t[0] = 20
    with pytest.raises(ValueError, match="class token 20 >= 2 \\* num_classes"):
        tok.decode(t)
    t = tokens.clone()
    t[4] = 0
    with pytest.raises(ValueError, match="object slot 1 mixes padding"):
        tok.decode(t)
    t = tokens.clone()
    t[1], t[2] = t[2].item(), t[1].item()
    with pytest.raises(ValueError, match="bottom-right corner"):
        tok.decode(t)


def test_box_from_dict():
    box = box_from_dict({"category": 3, "bbox": [0.1, 0.2, 0.3, 0.4], "is_group_of": True})
    assert box == Box(3, 0.1, 0.2, 0.3, 0.4, is_group_of=True)
    assert box_from_dict({"category": 3, "bbox": [0, 0, 1, 1]}) == Box(3, 0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("obj, match", [
    ({"bbox": [0, 0, 1, 1]}, "missing key 'category'"),
    ({"category": 1}, "missing key 'bbox'"),
    ({"category": "cat", "bbox": [0, 0, 1, 1]}, "key 'category' must be an int"),
    ({"category": True, "bbox": [0, 0, 1, 1]}, "key 'category' must be an int"),
    ({"category": 1, "bbox": [0, 0, 1]}, r"key 'bbox' must be 4 finite numbers \[x0, y0, w, h\]"),
    ({"category": 1, "bbox": [0, 0, 1, "1"]}, "key 'bbox' must be 4"),
    ({"category": 1, "bbox": [0, 0, 1, 1], "is_group_of": "yes"}, "key 'is_group_of' must be a bool"),
    ([1, [0, 0, 1, 1]], "must be a dict"),
])
def test_box_from_dict_errors(obj, match):
    with pytest.raises(ValueError, match=match):
        box_from_dict(obj)
