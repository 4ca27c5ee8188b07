"""Precompute turns each sample's boxes (KEY.json, from jobs.url_list through ingest) into the layout tokens
of its crop (layout.boxes_key): the builder's order (truncate, shuffle, drop boxes outside the crop), counts of
what was dropped per shard and in the manifest, malformed boxes skipped and counted. Pure of Ray:
pipeline.precompute.shard on hand-made img2dataset samples."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion.layout import LayoutTokenizer
from pipeline.conditions.layouts import LayoutConfig, layout_tokens
from pipeline.latents.manifest import build_manifest
from pipeline.precompute.shard import ImagePolicy, decode_sample, process_shard
from pipeline.precompute.stage import PrecomputeConfig, TokenizerConfig
from pipeline.shards import iter_samples, write_shard

POLICY = LayoutConfig("boxes", num_classes=5)


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _sample(key: str, boxes, width: int = 96, height: int = 64, as_string: bool = True) -> dict:
    meta = {"boxes": json.dumps(boxes) if as_string else boxes, "caption": "x"}
    return {"__key__": key, "jpg": _jpeg(width, height), "txt": b"objects", "json": json.dumps(meta).encode()}


def _box(category: int, x0: float, y0: float, w: float, h: float, group: bool = False) -> dict:
    return {"category": category, "bbox": [x0, y0, w, h], "is_group_of": group}


def test_boxes_outside_the_centre_crop_are_dropped_and_the_crop_window_is_encoded():
    # 96 x 64 picture, centre crop: the square x in [16, 80) px, i.e. [1/6, 5/6) of the width.
    boxes = [_box(1, 0.0, 0.1, 0.1, 0.5), _box(2, 0.4, 0.2, 0.3, 0.6, group=True), _box(3, 0.9, 0.0, 0.1, 1.0)]
    counts = {"objects_dropped": 0, "boxes_outside_crop": 0}
    decoded, _ = decode_sample(_sample("000001", boxes), ImagePolicy(32), "s.tar", POLICY, counts)
    assert counts == {"objects_dropped": 0, "boxes_outside_crop": 2}
    assert decoded.tokens.dtype == np.int32 and decoded.tokens.shape == (92,)
    kept, crop = LayoutTokenizer(5).decode(torch.from_numpy(decoded.tokens.astype(np.int64)))
    assert [(b.category, b.is_group_of) for b in kept] == [(2, True)]
    # Boxes stay in whole-picture coordinates (up to the 90-grid), the crop tokens hold the window.
    assert kept[0].x0 == pytest.approx(0.4, abs=0.5 / 89) and kept[0].h == pytest.approx(0.6, abs=1 / 89)
    assert crop == pytest.approx((16 / 96, 0.0, 80 / 96, 1.0), abs=0.5 / 89)


def test_past_max_objects_boxes_are_truncated_then_shuffled_by_the_key():
    boxes = [_box(i % 5, 0.02 * i, 0.02 * i, 0.05, 0.05) for i in range(34)]
    meta = {"boxes": boxes}
    tokens, counts = layout_tokens(meta, (100, 100), (0, 0, 100), POLICY, "s.tar/000001", 0)
    assert counts == {"objects_dropped": 4, "boxes_outside_crop": 0}
    kept, _ = LayoutTokenizer(5).decode(torch.from_numpy(tokens.astype(np.int64)))
    # Truncation keeps the first 30 (the builder's order), in an order drawn from the key.
    starts = sorted(round(b.x0 / 0.02) for b in kept)
    assert starts == list(range(30)) and [round(b.x0 / 0.02) for b in kept] != list(range(30))
    again, _ = layout_tokens(meta, (100, 100), (0, 0, 100), POLICY, "s.tar/000001", 0)
    other, _ = layout_tokens(meta, (100, 100), (0, 0, 100), POLICY, "s.tar/000002", 0)
    np.testing.assert_array_equal(tokens, again)
    assert not np.array_equal(tokens, other)


@pytest.mark.parametrize("boxes, message", [
    ([_box(1, 0.5, 0.5, 0.6, 0.2)], "reaches past the image"),
    ([_box(7, 0.1, 0.1, 0.2, 0.2)], r"category 7 outside \[0, num_classes = 5\)"),
    ("not json", "not JSON"),
    ([{"bbox": [0, 0, 1, 1]}], "missing key 'category'"),
])
def test_malformed_boxes_raise_naming_the_sample(boxes, message):
    meta = {"boxes": boxes}
    with pytest.raises(ValueError, match=message):
        layout_tokens(meta, (64, 64), (0, 0, 64), POLICY, "s.tar/000003", 0)
    with pytest.raises(ValueError, match=r"s.tar/000003: KEY.json has no 'boxes'"):
        layout_tokens({}, (64, 64), (0, 0, 64), POLICY, "s.tar/000003", 0)


def test_a_shard_keeps_layout_tokens_and_counts_bad_boxes_and_drops(tmp_path):
    good = [_box(0, 0.2, 0.2, 0.3, 0.3), _box(4, 0.0, 0.0, 0.05, 0.05)]  # the second is outside the crop
    samples = [_sample("000000", good), _sample("000001", [_box(9, 0, 0, 0.1, 0.1)]),
               _sample("000002", good[:1], as_string=False), _sample("000003", [])]
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "00000.tar", samples)

    def encode(chunks):
        for chunk in chunks:
            yield np.zeros((len(chunk), 4, 8, 8), np.float16)

    stats = process_shard(tmp_path / "in" / "00000.tar", tmp_path / "out", ImagePolicy(32), 2, encode,
                          layout=POLICY)
    assert stats["count"] == 3 and stats["skipped"]["bad_boxes"] == 1
    assert stats["layout"] == {"objects_dropped": 0, "boxes_outside_crop": 1}
    stored = {s["__key__"]: np.load(io.BytesIO(s["tokens.npy"])) for s in iter_samples(tmp_path / "out" / "00000.tar")}
    assert sorted(stored) == ["000000", "000002", "000003"]
    np.testing.assert_array_equal(stored["000000"], stored["000002"])  # one box kept, list or JSON string alike
    assert (stored["000003"][:90] == 8191).all()  # no boxes: the empty layout
    manifest = build_manifest(encoder={"kind": "kl", "config": {}, "sha256": "x", "source": "s"}, resolution=32,
                              crop="center", dtype="float16", latent_shape=[4, 8, 8], scale_factor=1.0,
                              scale_factor_source="config", shards=[stats, stats], tokenizer=POLICY.spec())
    assert manifest["layout"] == {"objects_dropped": 0, "boxes_outside_crop": 2}
    assert manifest["skipped"]["bad_boxes"] == 2
    assert manifest["tokenizer"] == {"kind": "layout", "boxes_key": "boxes", "num_classes": 5, "num_tokens": 8192,
                                     "max_objects": 30, "max_length": 92}


def test_layout_config_errors_name_the_key():
    base = dict(input_dir="a", output_dir="b", autoencoder="c")
    with pytest.raises(ValueError, match="layout.num_classes is not"):
        PrecomputeConfig(**base, layout=LayoutConfig(boxes_key="boxes"))
    with pytest.raises(ValueError, match="unset tokenizer.kind and text_encoder.kind"):
        PrecomputeConfig(**base, layout=LayoutConfig(boxes_key="boxes", num_classes=3),
                         tokenizer=TokenizerConfig(kind="openclip"))
    with pytest.raises(ValueError, match="num_classes"):
        PrecomputeConfig(**base, layout=LayoutConfig(boxes_key="boxes", num_classes=5000))
    cfg = PrecomputeConfig(**base, layout=LayoutConfig(boxes_key="boxes", num_classes=3, num_tokens=257))
    assert cfg.resolved_tokenizer()["max_length"] == 92 and cfg.resolved_tokenizer()["num_tokens"] == 257
