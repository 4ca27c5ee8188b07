"""Segmentation maps in ingest (pipeline.ingest.maps): decoding, fetching, geometry equal to the image's,
finalize_shard with maps, and config errors. No Ray; HTTP only against a loopback server."""
import dataclasses
import inspect
import io
import json
from pathlib import Path

import img2dataset
import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from img2dataset.resizer import Resizer
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from jobs.demo.http_server import LoopbackServer, Route
from pipeline.ingest.maps import RESIZE_ONLY_IF_BIGGER, MapSettings, segmentation_png
from pipeline.ingest.part import finalize_shard
from pipeline.ingest.stage import RESIZE_MODES, IngestConfig, map_settings, plan_parts, summarize
from pipeline.ingest.url_lists import MetadataFilters
from pipeline.shards import iter_samples, write_shard

IMAGE_SIZE = 64
# Region colours of the synthetic images and their class ids: ids far apart, so that a blending
# interpolation would produce ids outside this set. White/255: `border` padding (image / map).
REGIONS = {(220, 40, 40): 3, (40, 180, 40): 9, (40, 40, 220): 200, (255, 255, 255): 255}


def _png(array, mode=None, **save):
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def _sample(ref, width, height, out_w=None, out_h=None, column="seg"):
    meta = {column: ref, "original_width": width, "original_height": height, "width": out_w or width,
            "height": out_h or height}
    return {"__key__": "000000000", "json": json.dumps(meta).encode()}


def _settings(map_dir=None, resize_mode="no", image_size=IMAGE_SIZE):
    return MapSettings(column="seg", map_dir=str(map_dir) if map_dir else None, timeout_s=5.0,
                       image_size=image_size, resize_mode=resize_mode)


def _ids(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


def _labels(height, width):
    """uint8 (H, W) ids of three regions with one vertical and one slanted boundary."""
    y, x = np.mgrid[:height, :width]
    a = int(0.37 * width)
    ids = np.full((height, width), 3, np.uint8)
    ids[x >= a] = 9
    ids[(x >= a) & (y >= 0.3 * height + 0.4 * (x - a) * height / width)] = 200
    return ids


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- decoding ------------------------------------------------------------------------------------


def test_l_map_keeps_its_ids(tmp_path):
    ids = _labels(30, 40)
    png, reason = segmentation_png(_sample(str(_write(tmp_path / "m.png", _png(ids))), 40, 30), _settings())
    assert reason is None
    np.testing.assert_array_equal(_ids(png), ids)


def test_p_map_gives_palette_indices_not_colours(tmp_path):
    indices = np.zeros((20, 30), np.uint8)
    indices[:, 10:], indices[12:, :] = 1, 2
    image = Image.fromarray(indices, "P")
    image.putpalette([10, 10, 10, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))  # colours unlike the indices
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    _write(tmp_path / "p.png", buffer.getvalue())
    png, reason = segmentation_png(_sample("p.png", 30, 20), _settings(map_dir=tmp_path))
    assert reason is None
    np.testing.assert_array_equal(_ids(png), indices)


def test_16_bit_map_accepted_only_with_8_bit_ids(tmp_path):
    ids16 = _labels(20, 30).astype(np.uint16)
    _write(tmp_path / "ok.png", _png(ids16))
    assert Image.open(tmp_path / "ok.png").mode.startswith("I")
    png, reason = segmentation_png(_sample("ok.png", 30, 20), _settings(map_dir=tmp_path))
    assert reason is None
    np.testing.assert_array_equal(_ids(png), ids16)
    ids16[0, 0] = 300
    _write(tmp_path / "big.png", _png(ids16))
    assert segmentation_png(_sample("big.png", 30, 20), _settings(map_dir=tmp_path)) == (None, "map_id_out_of_range")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_multi_channel_map_is_refused(tmp_path, mode):
    _write(tmp_path / "c.png", _png(_labels(20, 30), mode))
    assert segmentation_png(_sample("c.png", 30, 20), _settings(map_dir=tmp_path)) == (None, "map_not_single_channel")


def test_undecodable_and_wrong_size_maps(tmp_path):
    _write(tmp_path / "bad.png", b"not a png at all")
    _write(tmp_path / "m.png", _png(_labels(20, 30)))
    settings = _settings(map_dir=tmp_path)
    assert segmentation_png(_sample("bad.png", 30, 20), settings) == (None, "map_decode_error")
    assert segmentation_png(_sample("m.png", 30, 21), settings) == (None, "map_size_mismatch")
    assert segmentation_png(_sample("m.png", 20, 30), settings) == (None, "map_size_mismatch")  # transposed


# --- fetching ------------------------------------------------------------------------------------


def test_missing_file_and_missing_value(tmp_path):
    _write(tmp_path / "m.png", _png(_labels(20, 30)))
    settings = _settings(map_dir=tmp_path)
    assert segmentation_png(_sample("nope.png", 30, 20), settings) == (None, "map_missing")
    assert segmentation_png(_sample(None, 30, 20), settings) == (None, "map_missing")
    assert segmentation_png(_sample("  ", 30, 20), settings) == (None, "map_missing")
    assert segmentation_png(_sample(".", 30, 20), settings) == (None, "map_download_error")  # a folder
    other = tmp_path / "elsewhere"
    other.mkdir()
    absolute = str(tmp_path / "m.png")  # absolute paths are read as they are, whatever map_dir
    assert segmentation_png(_sample(absolute, 30, 20), _settings(map_dir=other))[1] is None


def test_http_maps_against_a_loopback_server(tmp_path):
    ids = _labels(20, 30)
    _write(tmp_path / "www" / "maps" / "m.png", _png(ids))
    with LoopbackServer(tmp_path / "www", {"/e500": Route(500)}) as server:
        settings = _settings()
        png, reason = segmentation_png(_sample(server.url("maps/m.png"), 30, 20), settings)
        assert reason is None
        np.testing.assert_array_equal(_ids(png), ids)
        assert segmentation_png(_sample(server.url("maps/gone.png"), 30, 20), settings) == (None, "map_missing")
        assert segmentation_png(_sample(server.url("e500"), 30, 20), settings) == (None, "map_download_error")
    # The server is closed: the connection is refused.
    assert segmentation_png(_sample(server.url("maps/m.png"), 30, 20), settings) == (None, "map_download_error")


# --- geometry: the map is resized and cropped exactly as img2dataset resizes and crops the image --


def _image_resizer(resize_mode):
    """img2dataset's Resizer as stage.download() configures it (its defaults for what download() leaves)."""
    cfg = IngestConfig(inputs=["u.parquet"], output_dir="out")
    defaults = {k: p.default for k, p in inspect.signature(img2dataset.download).parameters.items()}
    return Resizer(IMAGE_SIZE, resize_mode, RESIZE_ONLY_IF_BIGGER,
                   upscale_interpolation=defaults["upscale_interpolation"],
                   downscale_interpolation=defaults["downscale_interpolation"],
                   encode_quality=cfg.encode_quality, encode_format=cfg.encode_format)


@pytest.mark.parametrize("resize_mode", RESIZE_MODES)
@pytest.mark.parametrize("width, height", [(300, 200), (200, 300), (50, 40)])  # the last is upscaled
def test_map_lands_on_the_image_pixels_of_its_class(tmp_path, resize_mode, width, height):
    ids = _labels(height, width)
    colours = {i: c for c, i in REGIONS.items()}
    rgb = np.array([colours[i] for i in ids.ravel()], np.uint8).reshape(height, width, 3)
    jpg, out_w, out_h, orig_w, orig_h, err = _image_resizer(resize_mode)(io.BytesIO(_png(rgb)))
    assert err is None and (orig_w, orig_h) == (width, height)
    _write(tmp_path / "m.png", _png(ids))
    sample = _sample("m.png", width, height, out_w, out_h)
    png, reason = segmentation_png(sample, _settings(tmp_path, resize_mode))
    assert reason is None
    seg = _ids(png)
    image = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), np.int32)
    assert seg.shape == image.shape[:2] == (out_h, out_w)
    assert set(np.unique(seg)) <= set(REGIONS.values())  # nearest: no blended ids
    table = np.array(list(REGIONS), np.int32)
    nearest = np.abs(image[:, :, None, :] - table).sum(-1).argmin(-1)
    from_colour = np.array(list(REGIONS.values()))[nearest]
    assert (from_colour == seg).mean() >= 0.99
    windows = sliding_window_view(np.pad(seg, 3, mode="edge"), (7, 7))
    interior = windows.min(axis=(-1, -2)) == windows.max(axis=(-1, -2))  # >= 3 px from any boundary
    assert interior.mean() > 0.5
    np.testing.assert_array_equal(from_colour[interior], seg[interior])


# --- finalize_shard with maps ----------------------------------------------------------------------


def _jpeg(size):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def _raw_shard(raw, maps):
    """Keys 0..3 downloaded (2's map file missing, 3 the same picture as 2), 4 failed to download."""
    raw.mkdir()
    keys = [f"{i:09d}" for i in range(5)]
    pictures = {"000000003": "hash000000002"}
    samples = []
    for i, key in enumerate(keys[:4]):
        if key != "000000002":
            _write(maps / f"{key}.png", _png(_labels(64, 80)))
        meta = {"key": key, "caption": f"caption {i}", "seg": f"{key}.png",
                "sha256": pictures.get(key, f"hash{key}"), "original_width": 80, "original_height": 64,
                "width": IMAGE_SIZE, "height": IMAGE_SIZE}
        samples.append({"__key__": key, "jpg": _jpeg((IMAGE_SIZE, IMAGE_SIZE)), "txt": meta["caption"].encode(),
                        "json": json.dumps(meta).encode()})
    write_shard(raw / "00000.tar", samples)
    pd.DataFrame({"key": keys, "status": ["success"] * 4 + ["failed_to_download"],
                  "error_message": [None] * 4 + ["HTTP Error 404: Not Found"]}).to_parquet(raw / "00000.parquet")


def test_finalize_shard_adds_seg_png_and_counts_failed_maps(tmp_path):
    raw, out, maps = tmp_path / "raw", tmp_path / "out", tmp_path / "maps"
    out.mkdir()
    _raw_shard(raw, maps)
    settings = _settings(maps, "center_crop")
    stats = finalize_shard(raw, 0, out, 0, MetadataFilters(), claim=None, maps=settings)
    final = pd.read_parquet(out / "00000.parquet").set_index("key")
    assert final.loc["000000002", ["status", "reason"]].tolist() == ["failed_map", "map_missing"]
    assert final.loc["000000003", "status"] == "success"  # the picture's first copy lost its map
    assert stats["successes"] == 3
    assert stats["failed_map"] == {"map_missing": 1} and stats["status"]["failed_map"] == 1
    kept = list(iter_samples(out / "00000.tar"))
    assert [s["__key__"] for s in kept] == ["000000000", "000000001", "000000003"]
    for s in kept:
        assert _ids(s["seg.png"]).shape == (IMAGE_SIZE, IMAGE_SIZE)
    read_back = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    assert [{k for k in s if not k.startswith("__")} for s in read_back] == [{"jpg", "txt", "json", "seg.png"}] * 3
    cfg = IngestConfig(inputs=["u.parquet"], output_dir=str(out), map_col="seg")
    summary = summarize(cfg, {"input_rows": 5, "filtered_before_download": {}, "duplicate_urls": 0}, 1.0)
    assert summary["failed_map"] == {"map_missing": 1} and summary["downloaded"] == 3


# --- config ----------------------------------------------------------------------------------------


def test_map_config_errors_name_the_key(tmp_path):
    base = {"inputs": ["u.parquet"], "output_dir": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="map_dir is set but map_col is not"):
        IngestConfig(**base, map_dir=str(tmp_path))
    with pytest.raises(ValueError, match="map_dir=.* is not an existing folder"):
        IngestConfig(**base, map_col="seg", map_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="map_col must name its own column"):
        IngestConfig(**base, map_col="url")
    renamed = map_settings(IngestConfig(**base, map_col="status"))  # img2dataset's own column name
    assert renamed.column == "source_status" and renamed.map_dir == str(Path.cwd().resolve())
    assert map_settings(IngestConfig(**base)) is None


def test_url_list_without_the_map_column_fails_before_any_download(tmp_path):
    good, bad = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["x"], "seg": ["x.png"]}).to_parquet(good)
    pd.DataFrame({"url": ["http://127.0.0.1:9/y.jpg"], "caption": ["y"]}).to_parquet(bad)
    cfg = IngestConfig(inputs=[str(good), str(bad)], output_dir=str(tmp_path / "out"), map_col="seg")
    with pytest.raises(ValueError, match=r"b\.parquet lacks the segmentation map column 'seg' \(map_col\)"):
        plan_parts(cfg)
    assert not (tmp_path / "out" / "_work").exists()
    plan = plan_parts(dataclasses.replace(cfg, inputs=[str(good)]))
    assert "seg" in plan["columns"]
    assert pd.read_parquet(tmp_path / "out" / "_work" / "parts" / "00000.parquet")["seg"].tolist() == ["x.png"]
