"""Precompute keeps each sample's segmentation map (map_classes=N): cut by its image's crop box,
resized by nearest neighbour, checked against N; bad maps stop the stage naming shard and key.
Pure of Ray: pipeline.precompute.shard.decode_sample on hand-made img2dataset samples."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.precompute.shard import ImagePolicy, decode_sample

COLOURS = np.array([[230, 30, 30], [30, 200, 60], [40, 60, 220], [240, 220, 30]], np.uint8)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode == "P":
        image = image.convert("P")  # palette indices == grey levels for an L image with few levels
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene(width: int, height: int) -> np.ndarray:
    """uint8 [H, W] ids: four vertical bands whose widths vary, and a block of class 3 in the middle."""
    ids = np.zeros((height, width), np.uint8)
    edges = [0, width // 5, width // 2, 4 * width // 5, width]
    for k in range(3):
        ids[:, edges[k]:edges[k + 1]] = k
    ids[height // 3: 2 * height // 3, width // 3: 2 * width // 3] = 3
    return ids


def sample(ids: np.ndarray, key: str = "000007", seg: bytes | None = None) -> dict:
    picture = COLOURS[ids]
    return {"__key__": key, "png": _png(picture), "txt": b"a landscape", "json": json.dumps({}).encode(),
            **({"seg.png": _png(ids) if seg is None else seg} if seg is not False else {})}


def recovered_ids(image_3HW: np.ndarray) -> np.ndarray:
    """The class of each pixel of a (resized) picture: its nearest palette colour."""
    pixels = image_3HW.transpose(1, 2, 0)[..., None, :].astype(np.int32)
    return np.argmin(((pixels - COLOURS.astype(np.int32)) ** 2).sum(-1), axis=-1)


@pytest.mark.parametrize("width, height, crop, fraction", [(300, 200, "random", 0.6), (200, 300, "center", 1.0),
                                                           (640, 480, "random", 1.0)])
def test_the_map_is_cut_and_resized_as_its_image(width, height, crop, fraction):
    ids = scene(width, height)
    policy = ImagePolicy(64, crop, seed=3, min_crop_fraction=fraction, max_crop_fraction=fraction, map_classes=4)
    decoded, image = decode_sample(sample(ids), policy, "00002.tar")
    kept = np.asarray(Image.open(io.BytesIO(decoded.map_png)))
    assert kept.shape == (64, 64) and kept.dtype == np.uint8 and set(np.unique(kept)) <= {0, 1, 2, 3}
    left, top, side = decoded.meta["crop_box"]
    expected = np.asarray(Image.fromarray(ids[top:top + side, left:left + side]).resize((64, 64),
                                                                                       Image.Resampling.NEAREST))
    np.testing.assert_array_equal(kept, expected)
    # The picture the encoder saw shows the same classes where the map says so (bicubic blurs edges).
    assert (recovered_ids(image) == kept).mean() > 0.95


def test_palette_maps_keep_their_indices():
    ids = scene(128, 96)
    palette = _png(ids, mode="P")
    assert Image.open(io.BytesIO(palette)).mode == "P"
    policy = ImagePolicy(64, map_classes=4)
    from_palette, _ = decode_sample(sample(ids, seg=palette), policy, "s.tar")
    from_grey, _ = decode_sample(sample(ids), policy, "s.tar")
    assert from_palette.map_png == from_grey.map_png


def test_without_map_classes_nothing_changes():
    decoded, _ = decode_sample(sample(scene(96, 96)), ImagePolicy(64), "s.tar")
    assert decoded.map_png is None


@pytest.mark.parametrize("seg, message", [
    (False, r"s.tar/000007: no KEY.seg.png, but map_classes=4 .* ingest with map_col="),
    (_png(np.full((96, 96), 9, np.uint8)), r"s.tar/000007: KEY.seg.png holds class id 9, but 4 classes"),
    (_png(np.zeros((48, 96), np.uint8)), r"s.tar/000007: KEY.seg.png is 96x48, its image 96x96"),
    (_png(np.zeros((96, 96, 3), np.uint8)), r"s.tar/000007: KEY.seg.png is not a one-channel map"),
    (b"not a png", r"s.tar/000007: KEY.seg.png does not decode"),
])
def test_bad_maps_name_the_shard_and_key(seg, message):
    with pytest.raises(ValueError, match=message):
        decode_sample(sample(scene(96, 96), seg=seg), ImagePolicy(64, map_classes=4), "s.tar")


def test_map_classes_must_fit_eight_bits():
    with pytest.raises(ValueError, match="map_classes=300"):
        ImagePolicy(64, map_classes=300)
