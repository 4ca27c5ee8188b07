"""Ingest against a real HTTP server on 127.0.0.1, real img2dataset, a real local Ray cluster."""
import dataclasses
import io
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from jobs.demo.http_server import LoopbackServer, Route
from jobs.demo.scenes import write_demo_dataset
from pipeline.ingest.stage import IngestConfig, ingest
from pipeline.ingest.url_lists import MetadataFilters, Threshold

pytestmark = pytest.mark.slow
NUM_GOOD = 18


def _jpeg(size):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    write_demo_dataset(www, NUM_GOOD, seed=3)
    good = (www / "images" / "000001.jpg").read_bytes()
    routes = {"/e500": Route(500), "/slow": Route(200, good, delay_s=12.0),
              "/text": Route(200, b"<html>not an image</html>", content_type="text/html"),
              "/trunc": Route(200, good[: len(good) // 2]), "/tiny": Route(200, _jpeg(8)),
              "/same-picture": Route(200, good), "/flaky": Route(200, _jpeg(40), fail_times=1)}
    with LoopbackServer(www, routes) as s:
        yield s


def _url_list(server, path):
    good = [server.url(f"images/{i:06d}.jpg") for i in range(NUM_GOOD)]
    rows = [(u, f"caption {i}", 0.1) for i, u in enumerate(good)] + [
        (server.url("missing.jpg"), "a 404", 0.1), (server.url("e500"), "a 500", 0.1),
        (server.url("slow"), "a timeout", 0.1), (server.url("text"), "not an image", 0.1),
        (server.url("trunc"), "truncated jpeg", 0.1), (server.url("tiny"), "too small", 0.1),
        (server.url("same-picture"), "same bytes as image 1", 0.1), (server.url("flaky"), "503 once", 0.1),
        (server.url("images/000003.jpg").replace("http://", "HTTP://") + "#dup", "same url", 0.1),
        (server.url("images/000004.jpg") + "?other", "", 0.1), (server.url("images/000005.jpg") + "?x", "y" * 300, 0.1),
        (server.url("images/000006.jpg") + "?y", "unsafe", 0.95)]
    pd.DataFrame(rows, columns=["URL", "TEXT", "punsafe"]).to_parquet(path)
    return path


def _config(inputs, out, **overrides):
    filters = MetadataFilters(min_width=16, min_height=16, max_caption_chars=200,
                              thresholds={"punsafe": Threshold(max=0.5)})
    return IngestConfig(inputs=[str(inputs)], output_dir=str(out), url_col="URL", caption_col="TEXT",
                        image_size=32, part_size=10, thread_count=8, timeout_s=5, filters=filters, **overrides)


@pytest.fixture(scope="module")
def first_run(ray_cluster, server, tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    cfg = _config(_url_list(server, root / "urls.parquet"), root / "out")
    return cfg, ingest(cfg)


def test_counts_every_reason_exactly(first_run):
    _, summary = first_run
    assert summary["input_rows"] == NUM_GOOD + 12
    assert summary["filtered_before_download"] == {"missing_url": 0, "caption_too_short": 1, "caption_too_long": 1,
                                                   "punsafe_out_of_range": 1}
    assert summary["duplicate_urls"] == 1
    assert summary["failed_to_download"] == {"http_404": 1, "http_5xx": 2, "timeout": 1}  # 500 and the flaky 503
    assert summary["failed_to_resize"] == {"decode_error": 2}
    assert summary["filtered_after_download"] == {"too_small": 1}
    assert summary["duplicate_content"] == 1
    assert summary["downloaded"] == NUM_GOOD
    assert summary["shards"] == 3  # 26 rows after the metadata filters, 10 per part


def test_shards_read_back_with_webdataset_and_tar(first_run):
    cfg, summary = first_run
    out = cfg.output_dir
    shards = sorted(str(p) for p in Path(out).glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == summary["downloaded"]
    for sample in samples:
        assert sample["jpg"].size == (32, 32)
        assert sample["txt"] == sample["json"]["caption"]
    listed = subprocess.run(["tar", "tf", shards[0]], check=True, capture_output=True, text=True).stdout.split()
    assert len(listed) == 3 * len(list(wds.WebDataset(shards[0], shardshuffle=False)))
    assert {name.rsplit(".", 1)[1] for name in listed} == {"jpg", "txt", "json"}
    hashes = [s["json"]["sha256"] for s in samples]
    assert len(hashes) == len(set(hashes))  # every picture once
    assert json.loads((Path(out) / "ingest_summary.json").read_text()) == summary


def test_rerun_after_a_killed_run_completes_without_duplicates(first_run, tmp_path):
    cfg, summary = first_run
    out = tmp_path / "out"
    shutil.copytree(cfg.output_dir, out)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02].*")}
    # As if killed while downloading part 1: no final shard 1, img2dataset's partial output and a
    # temp file of ours left behind.
    for suffix in (".tar", ".parquet", "_stats.json"):
        (out / f"00001{suffix}").unlink()
    (out / "00001.tar.tmp-12345").write_bytes(b"half a tar")
    (out / "_work" / "raw" / "00001.tar").write_bytes(b"half a tar")
    again = ingest(dataclasses.replace(cfg, output_dir=str(out)))
    assert {k: again[k] for k in summary if k not in ("seconds", "images_per_s")} == \
           {k: summary[k] for k in summary if k not in ("seconds", "images_per_s")}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[02].*")} == finished  # not redone
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode())
    hashes = [s["json"]["sha256"] for s in samples]
    assert len(hashes) == len(set(hashes)) == summary["downloaded"]


def test_retry_failed_downloads_only_transient_failures(first_run, server, tmp_path):
    cfg, summary = first_run
    out = tmp_path / "out"
    shutil.copytree(cfg.output_dir, out)
    hits_before = dict(server.hits)
    retried = ingest(dataclasses.replace(cfg, output_dir=str(out), retry_failed=True))
    assert retried["retried"] == 3                          # the 500, the timeout and the flaky 503
    assert retried["downloaded"] == summary["downloaded"] + 1  # the flaky one answers the second time
    assert retried["failed_to_download"] == {"http_404": 1, "http_5xx": 1, "timeout": 1}  # 404 kept, not retried
    assert server.hits["/flaky"] == hits_before["/flaky"] + 1
    assert retried["shards"] == summary["shards"] + 1


def test_bad_url_list_fails_before_any_download(ray_cluster, tmp_path):
    pd.DataFrame({"link": ["http://127.0.0.1:9/x.jpg"], "text": ["x"]}).to_parquet(tmp_path / "u.parquet")
    with pytest.raises(ValueError, match=r"found \['link', 'text'\]"):
        ingest(IngestConfig(inputs=[str(tmp_path / "u.parquet")], output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "_work" / "raw").exists()
