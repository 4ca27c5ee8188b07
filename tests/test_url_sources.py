"""COCO / OpenImages / class folders -> URL lists (pipeline/ingest/sources.py, jobs/url_list.py), and one
real `jobs.ingest` run that carries the `boxes` column into each sample's KEY.json."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from jobs.demo.http_server import LoopbackServer
from jobs.url_list import main as url_list_main
from ldm.diffusion.layout import LayoutTokenizer, box_from_dict
from pipeline.ingest.sources import class_folder_rows, coco_rows, openimages_rows
from pipeline.ingest.stage import IngestConfig, ingest
from pipeline.shards import iter_samples

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- COCO

# COCO ids out of order: contiguous ids follow ascending COCO id (person 1 -> 0, car 3 -> 1, dog 18 -> 2).
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
IMAGES = [{"id": 10, "file_name": "a.jpg", "width": 200, "height": 100, "coco_url": "http://coco/a.jpg"},
          {"id": 11, "file_name": "b.jpg", "width": 100, "height": 100, "coco_url": "http://coco/b.jpg"},
          {"id": 12, "file_name": "c.jpg", "width": 100, "height": 100},  # no coco_url
          {"id": 13, "file_name": "d.jpg", "width": 100, "height": 100, "coco_url": "http://coco/d.jpg"}]
ANNOTATIONS = [
    {"image_id": 10, "category_id": 1, "bbox": [20, 10, 50, 40], "iscrowd": 0},
    {"image_id": 10, "category_id": 18, "bbox": [150, 50, 50.5, 50.5], "iscrowd": 1},  # 0.5 px over: clipped
    {"image_id": 10, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
    {"image_id": 11, "category_id": 3, "bbox": [-3, 0, 10, 10], "iscrowd": 0},    # 3 px over: outside_image
    {"image_id": 11, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},      # w = 0: empty
    {"image_id": 11, "category_id": 3, "bbox": [1, 1, 0.01, 0.01], "iscrowd": 0},  # area 1e-8: too_small
    {"image_id": 12, "category_id": 3, "bbox": [10, 10, 20, 20], "iscrowd": 0}]
IMAGE_10_BOXES = [{"category": 0, "bbox": [0.1, 0.1, 0.25, 0.4], "is_group_of": False},
                  {"category": 2, "bbox": [0.75, 0.5, 0.25, 0.5], "is_group_of": True},
                  {"category": 0, "bbox": [0.0, 0.0, 0.05, 0.1], "is_group_of": False}]


def _coco_json(path: Path, images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_contiguous_ids_relative_boxes_and_every_drop_counted(tmp_path):
    rows, class_names, counts = coco_rows(_coco_json(tmp_path / "instances.json"))
    assert class_names == ["person", "car", "dog"]
    assert rows.to_dict("records") == [{"url": "http://coco/a.jpg", "caption": "person, dog", "width": 200,
                                        "height": 100, "boxes": json.dumps(IMAGE_10_BOXES), "image_id": 10}]
    assert counts == {"rows": 1, "boxes": 3, "clipped_boxes": 1,
                      "dropped_images": {"no_boxes": 2, "no_url": 1},
                      "dropped_boxes": {"empty": 1, "outside_image": 1, "too_small": 1}}


def test_coco_boxes_are_what_the_layout_tokenizer_reads(tmp_path):
    rows, class_names, _ = coco_rows(_coco_json(tmp_path / "instances.json"))
    boxes = [box_from_dict(b) for b in json.loads(rows["boxes"][0])]
    tokens, num_dropped = LayoutTokenizer(num_classes=len(class_names)).encode(boxes)  # validates every box
    assert num_dropped == 0 and boxes[1].is_group_of


def test_coco_image_base_url_prefix_or_local_folder(tmp_path):
    path = _coco_json(tmp_path / "instances.json")
    rows, _, counts = coco_rows(path, image_base="http://host:8000/train2017/")
    assert rows["url"].tolist() == ["http://host:8000/train2017/a.jpg", "http://host:8000/train2017/c.jpg"]
    assert counts["dropped_images"] == {"no_boxes": 2, "no_url": 0}  # every image now has a url
    (tmp_path / "my images").mkdir()
    rows, _, _ = coco_rows(path, image_base=str(tmp_path / "my images"))
    assert rows["url"][0] == (tmp_path / "my images" / "a.jpg").resolve().as_uri()
    assert rows["url"][0].startswith("file:///") and "%20" in rows["url"][0]
    with pytest.raises(ValueError, match="neither a URL prefix .* nor an existing folder"):
        coco_rows(path, image_base=str(tmp_path / "nowhere"))


def test_coco_min_object_area_is_relative(tmp_path):
    path = _coco_json(tmp_path / "instances.json")
    _, _, counts = coco_rows(path, min_object_area=0.01)  # drops the 0.05 x 0.1 = 0.005 person box too
    assert counts["boxes"] == 2 and counts["dropped_boxes"]["too_small"] == 2


@pytest.mark.parametrize("change, message", [
    (lambda p: p.write_text("{not json"), r"cannot read COCO instances file .*instances.json"),
    (lambda p: p.write_text(json.dumps({"images": [], "annotations": []})), r"lacks key\(s\) \['categories'\]"),
    (lambda p: _coco_json(p, annotations=[{"image_id": 10, "category_id": 1}]),
     r"annotations\[0\] lacks key\(s\) \['bbox'\]"),
    (lambda p: _coco_json(p, annotations=[{"image_id": 10, "category_id": 7, "bbox": [0, 0, 1, 1]}]),
     r"annotations\[0\] has category_id 7, which no category lists"),
    (lambda p: _coco_json(p, annotations=[{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}]),
     r"annotations\[0\] has image_id 99, which no image lists"),
    (lambda p: _coco_json(p, annotations=[{"image_id": 10, "category_id": 1, "bbox": [0, 0, 1]}]),
     r"annotations\[0\] has bbox \[0, 0, 1\]; expected 4 finite numbers"),
    (lambda p: _coco_json(p, images=[{"id": 1, "file_name": "x.jpg", "width": 0, "height": 5}]),
     r"image 1 has width 0 and height 5"),
    (lambda p: _coco_json(p, categories=CATEGORIES + [{"id": 3, "name": "truck"}]), r"category id 3 occurs twice"),
])
def test_coco_malformed_input_names_file_and_problem(tmp_path, change, message):
    path = tmp_path / "instances.json"
    change(path)
    with pytest.raises(ValueError, match=message) as err:
        coco_rows(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------- OpenImages

BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,"
              "IsInside")
# Kept boxes per label: /m/a 4, /m/b 2, /m/c 2 (tie with b: broken by LabelName), /m/d 1 of 4 (3 dropped
# for their geometry, so it does not count as frequent).
BOXES = [("img1", "/m/a", 0.25, 0.75, 0.125, 0.375, 0), ("img1", "/m/b", 0.0, 0.5, 0.5, 1.0, 1),
         ("img1", "/m/a", 0.5, 1.0005, 0.0, 0.5, 0),     # 0.0005 past the right edge: clipped
         ("img2", "/m/c", 0.0, 0.5, 0.0, 0.5, 0), ("img2", "/m/c", 0.5, 1.0, 0.5, 1.0, 0),
         ("img3", "/m/a", 0.0, 1.0, 0.0, 1.0, 0), ("img3", "/m/b", 0.0, 0.25, 0.0, 0.25, 0),
         ("img3", "/m/d", 0.0, 0.5, 0.0, 0.5, 0),
         ("img3", "/m/d", 0.0, 1.01, 0.0, 0.5, 0),       # 0.01 past: outside_image
         ("img3", "/m/d", 0.5, 0.5, 0.0, 0.5, 0),        # XMin == XMax: empty
         ("img3", "/m/d", 0.0, 0.005, 0.0, 0.005, 0),    # area 2.5e-5 < 1e-4: too_small
         ("img4", "/m/a", 0.0, 0.5, 0.0, 0.5, 0)]        # img4 is missing from the images CSV
CLASS_ROWS = "/m/a,Apple\n/m/b,Ball\n/m/c,Cat\n/m/d,Dog\n/m/e,Elephant\n"


def _openimages_files(tmp_path: Path, class_header: bool = False) -> tuple[Path, Path, Path]:
    lines = [BOX_HEADER] + [f"{i},xclick,{label},1,{x0},{x1},{y0},{y1},0,0,{g},0,0"
                            for i, label, x0, x1, y0, y1, g in BOXES]
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "images.csv").write_text("ImageID,Subset,OriginalURL,License\n"
                                         "img1,train,http://oi/1.jpg,cc\nimg2,train,http://oi/2.jpg,cc\n"
                                         "img3,train,,cc\n")
    (tmp_path / "classes.csv").write_text(("LabelName,DisplayName\n" if class_header else "") + CLASS_ROWS)
    return tmp_path / "boxes.csv", tmp_path / "images.csv", tmp_path / "classes.csv"


@pytest.mark.parametrize("class_header", [False, True], ids=["official-headerless", "with-header"])
def test_openimages_all_classes_by_frequency_with_clipping_and_drops(tmp_path, class_header):
    rows, class_names, counts = openimages_rows(*_openimages_files(tmp_path, class_header))
    assert class_names == ["Apple", "Ball", "Cat", "Dog"]  # kept-box frequency 3, 2, 2, 1; Elephant has none
    assert rows["image_id"].tolist() == ["img1", "img2"]  # img3 has no url, img4 is not in the images CSV
    assert rows["url"].tolist() == ["http://oi/1.jpg", "http://oi/2.jpg"]
    assert rows["caption"].tolist() == ["Apple, Ball", "Cat"]
    assert json.loads(rows["boxes"][0]) == [{"category": 0, "bbox": [0.25, 0.125, 0.5, 0.25], "is_group_of": False},
                                            {"category": 1, "bbox": [0.0, 0.5, 0.5, 0.5], "is_group_of": True},
                                            {"category": 0, "bbox": [0.5, 0.0, 0.5, 0.5], "is_group_of": False}]
    assert counts == {"rows": 2, "boxes": 5, "clipped_boxes": 1,
                      "dropped_images": {"no_boxes": 0, "not_in_images_csv": 1, "no_url": 1},
                      "dropped_boxes": {"empty": 1, "outside_image": 1, "too_small": 1, "other_class": 0}}


def test_openimages_top_k_classes_ties_broken_by_label_name(tmp_path):
    rows, class_names, counts = openimages_rows(*_openimages_files(tmp_path), num_classes=2)
    assert class_names == ["Apple", "Ball"]  # /m/b beats /m/c (both 2) by LabelName
    assert rows["image_id"].tolist() == ["img1"]  # img2 held only /m/c boxes
    assert counts["dropped_boxes"]["other_class"] == 3  # two /m/c and one /m/d
    assert counts["dropped_images"] == {"no_boxes": 1, "not_in_images_csv": 1, "no_url": 1}
    assert all(b["category"] in (0, 1) for b in json.loads(rows["boxes"][0]))


def test_openimages_bad_inputs_name_file_and_problem(tmp_path):
    boxes, images, classes = _openimages_files(tmp_path)
    with pytest.raises(ValueError, match=r"num_classes=5, but .*boxes.csv has kept boxes of 4 classes"):
        openimages_rows(boxes, images, classes, num_classes=5)
    classes.write_text("/m/a,Apple\n/m/b,Ball\n")
    with pytest.raises(ValueError, match=r"classes.csv has no DisplayName for 2 label\(s\), e.g. \['/m/c', '/m/d'\]"):
        openimages_rows(boxes, images, classes)
    (tmp_path / "urls.csv").write_text("ImageID,URL\nimg1,http://oi/1.jpg\n")
    with pytest.raises(ValueError, match=r"images CSV .*urls.csv lacks column\(s\) \['OriginalURL'\]; "
                                         r"found \['ImageID', 'URL'\]"):
        openimages_rows(boxes, tmp_path / "urls.csv", classes)
    classes.write_text(CLASS_ROWS)
    boxes.write_text(BOX_HEADER + "\nimg1,xclick,/m/a,1,0.1,oops,0.1,0.2,0,0,0,0,0\n")
    with pytest.raises(ValueError, match=r"boxes.csv: column XMax holds a non-number on data row 1 \('oops'\)"):
        openimages_rows(boxes, images, classes)
    with pytest.raises(ValueError, match=r"cannot read OpenImages bbox annotations CSV .*missing.csv"):
        openimages_rows(tmp_path / "missing.csv", images, classes)


# ---------------------------------------------------------------------------------------------- class folders


def _jpeg_bytes(color, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def _class_tree(root: Path) -> Path:
    for folder in ("cat/sub", "dog", "empty", ".cache"):
        (root / folder).mkdir(parents=True)
    (root / "cat" / "b.jpg").write_bytes(_jpeg_bytes((200, 0, 0)))
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "cat" / "a.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "dog" / "c.JPEG").write_bytes(_jpeg_bytes((0, 0, 200)))
    (root / "README.md").write_text("outside every class folder")
    return root


def test_class_folders_sorted_labels_and_skips_counted(tmp_path):
    root = _class_tree(tmp_path / "train")
    rows, class_names, counts = class_folder_rows(root)
    assert class_names == ["cat", "dog", "empty"]
    assert rows.to_dict("records") == [
        {"url": (root / "cat" / "a.png").as_uri(), "caption": "cat", "label": 0, "class_name": "cat"},
        {"url": (root / "cat" / "b.jpg").as_uri(), "caption": "cat", "label": 0, "class_name": "cat"},
        {"url": (root / "dog" / "c.JPEG").as_uri(), "caption": "dog", "label": 1, "class_name": "dog"}]
    assert counts == {"rows": 3, "classes": 3, "empty_classes": 1,
                      "skipped": {"hidden": 2, "outside_class_folder": 1, "nested_folder": 1, "not_image": 1}}
    with pytest.raises(ValueError, match="holds no class folders"):
        class_folder_rows(root / "empty")
    with pytest.raises(ValueError, match="is not an existing folder"):
        class_folder_rows(root / "nowhere")


def test_img2dataset_reads_file_urls_but_not_bare_paths(tmp_path):
    """The url form class folders and local COCO image_base use is what img2dataset's downloader opens."""
    from img2dataset.downloader import download_image

    rows, _, _ = class_folder_rows(_class_tree(tmp_path / "train"))
    key, stream, error = download_image((0, rows["url"][1]), 5, None, [])
    assert error is None and stream.getvalue() == (tmp_path / "train" / "cat" / "b.jpg").read_bytes()
    _, stream, error = download_image((0, str(tmp_path / "train" / "cat" / "b.jpg")), 5, None, [])
    assert stream is None and "unknown url type" in error


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_parquet_and_classes_txt_and_prints_counts(tmp_path, capsys):
    out = tmp_path / "lists" / "coco.parquet"
    result = url_list_main(["coco", str(_coco_json(tmp_path / "instances.json")), "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result and printed["rows"] == 1 and printed["num_classes"] == 3
    assert (tmp_path / "lists" / "classes.txt").read_text() == "person\ncar\ndog\n"
    assert pd.read_parquet(out)["boxes"].tolist() == [json.dumps(IMAGE_10_BOXES)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["classes.txt", "coco.parquet"]  # no temp files left

    url_list_main(["openimages", "--boxes", str(tmp_path / "boxes.csv"), "--images", str(tmp_path / "images.csv"),
                   "--classes", str(_openimages_files(tmp_path)[2]), "--num-classes", "2",
                   "--out", str(tmp_path / "oi" / "oi.parquet")])
    assert (tmp_path / "oi" / "classes.txt").read_text() == "Apple\nBall\n"


def test_cli_as_a_module_for_class_folders(tmp_path):
    root, out = _class_tree(tmp_path / "train"), tmp_path / "folders.parquet"
    done = subprocess.run([sys.executable, "-m", "jobs.url_list", "folders", str(root), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] == 3
    assert pd.read_parquet(out)["label"].tolist() == [0, 0, 1]
    assert (tmp_path / "classes.txt").read_text() == "cat\ndog\nempty\n"


def test_cli_errors_say_what_to_change(tmp_path, capsys):
    path = _coco_json(tmp_path / "instances.json")
    with pytest.raises(SystemExit) as exit_info:
        url_list_main(["coco", str(path), "--out", str(tmp_path / "list.csv")])
    assert exit_info.value.code == 2 and "must end in .parquet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        url_list_main(["coco", str(path), "--min-object-area", "0.9", "--out", str(tmp_path / "l.parquet")])
    assert "no image was kept" in capsys.readouterr().err and not (tmp_path / "l.parquet").exists()
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(SystemExit):
        url_list_main(["coco", str(tmp_path / "bad.json"), "--out", str(tmp_path / "l.parquet")])
    assert "bad.json lacks key(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_boxes_arrive_unchanged_in_the_ingested_samples_json(ray_cluster, tmp_path):
    www = tmp_path / "www" / "train2017"
    www.mkdir(parents=True)
    colors = {"a.jpg": (200, 30, 30), "c.jpg": (30, 200, 30)}
    for name, color in colors.items():
        (www / name).write_bytes(_jpeg_bytes(color, size=(200, 100) if name == "a.jpg" else (100, 100)))
    with LoopbackServer(tmp_path / "www") as server:
        out = tmp_path / "list" / "coco.parquet"
        url_list_main(["coco", str(_coco_json(tmp_path / "instances.json")), "--image-base",
                       server.url("train2017/"), "--out", str(out)])
        summary = ingest(IngestConfig(inputs=[str(out)], output_dir=str(tmp_path / "shards"), image_size=32,
                                      resize_mode="keep_ratio", part_size=10, thread_count=2, timeout_s=5))
    assert summary["downloaded"] == 2
    listed = pd.read_parquet(out).set_index("url")
    samples = [s for tar in sorted((tmp_path / "shards").glob("*.tar")) for s in iter_samples(tar)]
    metas = {m["url"]: m for m in (json.loads(s["json"]) for s in samples)}
    assert sorted(metas) == sorted(listed.index)
    for url, meta in metas.items():
        assert meta["boxes"] == listed.loc[url, "boxes"]  # the exact string, not re-serialised
        assert meta["caption"] == listed.loc[url, "caption"] and meta["image_id"] == listed.loc[url, "image_id"]
        assert meta["source_width"] == listed.loc[url, "width"]  # ingest renames img2dataset's own columns
        # keep_ratio keeps the whole picture (short side to 32), so the relative boxes still fit it
        assert (meta["width"], meta["height"]) == ((64, 32) if url.endswith("a.jpg") else (32, 32))
