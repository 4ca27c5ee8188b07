"""Standard annotation formats -> LAION-style URL lists for `jobs.ingest` (CLI: `python -m jobs.url_list`).

Layout-to-image (COCO, OpenImages) and class-conditional (ImageNet-style class folders) data enter
the pipeline like any text-to-image list: one row per image with `url` and a non-empty `caption`
(ingest drops samples with an empty one), plus columns that img2dataset saves into each sample's
KEY.json:

- `boxes` (COCO, OpenImages): a JSON string of `[{"category": int, "bbox": [x0, y0, w, h],
  "is_group_of": bool}, ...]`, relative to the original image (floats in [0, 1]): the dict that
  `ldm.diffusion.layout.box_from_dict` reads. `image_id` names the source image; COCO rows also
  carry the original `width` and `height` in pixels (OpenImages lists no sizes; ingest saves them
  as source_width / source_height, since img2dataset writes its own). Ingest these lists with a
  resize_mode that keeps the whole picture (keep_ratio, keep_ratio_largest, no): center_crop and
  border change what the relative boxes are relative to.
- `label` and `class_name` (class folders).

Each converter returns `(rows, class_names, counts)`: class id i is `class_names[i]`; `counts`
holds the kept rows and boxes and every dropped image, box or file by reason. Malformed input
raises ValueError naming the file and what is wrong; nothing here touches the network.

Local images become file:// URLs: img2dataset (downloader.download_image) opens every url with
`urllib.request.urlopen`, which reads file:// URLs and rejects a bare path ("unknown url type").
"""
import json
import math
import numbers
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
COCO_PIXEL_TOLERANCE = 1.0  # a box overshooting the image by at most this (rounding) is clipped to it
# OpenImages coordinates are already relative and the files give no image size: about one pixel
# of a 1024-pixel side.
RELATIVE_TOLERANCE = 1e-3
BOX_REASONS = ("empty", "outside_image", "too_small")
OPENIMAGES_BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")


# ---------------------------------------------------------------------------------------------- boxes


def clip_boxes(x0, y0, x1, y1, width, height, tolerance: float, min_object_area: float):
    """Corner boxes in the image's units -> (relative [N, 4] x0, y0, w, h; drop reason per box, '' if
    kept; clipped mask). A box past the image by at most `tolerance` is clipped to it, by more it is
    dropped as outside_image; empty: w or h <= 0 (before or after clipping); too_small: relative
    area below `min_object_area`."""
    x0, y0, x1, y1, width, height = (np.asarray(v, dtype=np.float64) for v in (x0, y0, x1, y1, width, height))
    overshoot = np.max(np.stack([-x0, -y0, x1 - width, y1 - height]), axis=0)
    cx0, cy0 = np.clip(x0, 0, width), np.clip(y0, 0, height)
    cx1, cy1 = np.minimum(x1, width), np.minimum(y1, height)
    rel = np.stack([cx0 / width, cy0 / height, (cx1 - cx0) / width, (cy1 - cy0) / height], axis=1)
    conditions = [~((x1 > x0) & (y1 > y0)), overshoot > tolerance, ~((cx1 > cx0) & (cy1 > cy0)),
                  rel[:, 2] * rel[:, 3] < min_object_area]
    reason = np.select(conditions, ["empty", "outside_image", "empty", "too_small"], default="")
    return rel, reason, (overshoot > 0) & (reason == "")


def _new_counts(image_reasons: tuple[str, ...], box_reasons: tuple[str, ...]) -> dict:
    return {"rows": 0, "boxes": 0, "clipped_boxes": 0, "dropped_images": dict.fromkeys(image_reasons, 0),
            "dropped_boxes": dict.fromkeys(box_reasons, 0)}


def _count_box_drops(counts: dict, reason: np.ndarray, clipped: np.ndarray) -> None:
    for name in BOX_REASONS:
        counts["dropped_boxes"][name] += int((reason == name).sum())
    counts["clipped_boxes"] += int(clipped.sum())


def _box_dicts(categories, rel, groups) -> list[dict]:
    return [{"category": int(c), "bbox": [float(v) for v in box], "is_group_of": bool(g)}
            for c, box, g in zip(categories, rel, groups)]


def _caption(boxes: list[dict], class_names: list[str]) -> str:
    """The image's distinct class names in first-appearance order."""
    return ", ".join(dict.fromkeys(class_names[b["category"]] for b in boxes))


def _check_min_area(min_object_area: float) -> None:
    if not 0 <= min_object_area < 1:
        raise ValueError(f"min_object_area={min_object_area} must be in [0, 1): it is a fraction of the image area")


# ---------------------------------------------------------------------------------------------- COCO


def _read_coco(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read COCO instances file {path}: {err}") from err
    missing = [k for k in ("images", "annotations", "categories") if k not in data] if isinstance(data, dict) \
        else ["images", "annotations", "categories"]
    if missing:
        raise ValueError(f"{path} lacks key(s) {missing}: a COCO instances_*.json is an object with 'images', "
                         "'annotations' and 'categories' (captions_*.json files have no boxes)")
    return data


def _checked_items(items, keys: tuple[str, ...], path: Path, section: str) -> list[dict]:
    if not isinstance(items, list):
        raise ValueError(f"{path}: '{section}' must be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"{path}: {section}[{i}] lacks key(s) {missing} (has {found})")
    return items


def _unique_ids(items: list[dict], path: Path, section: str) -> dict:
    by_id = {}
    for item in items:
        if item["id"] in by_id:
            raise ValueError(f"{path}: {section} id {item['id']!r} occurs twice; ids must be unique")
        by_id[item["id"]] = item
    return by_id


def _is_finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive(v) -> bool:
    return _is_finite(v) and v > 0


def _coco_images(data: dict, path: Path) -> dict:
    images = _unique_ids(_checked_items(data["images"], ("id", "file_name", "width", "height"), path, "images"),
                         path, "image")
    for image in images.values():
        if not (_is_positive(image["width"]) and _is_positive(image["height"])):
            raise ValueError(f"{path}: image {image['id']!r} has width {image['width']!r} and height "
                             f"{image['height']!r}; both must be positive numbers of pixels")
    return images


COCO_BOX_COLUMNS = ("image_id", "category", "x0", "y0", "x1", "y1", "width", "height", "group")


def _coco_box_arrays(annotations: list[dict], images: dict, category_index: dict, path: Path) -> dict:
    """COCO_BOX_COLUMNS of every annotation: image id, class id, corners and image size in pixels, iscrowd."""
    records = []
    for i, ann in enumerate(annotations):
        bbox, image = ann["bbox"], images.get(ann["image_id"])
        if image is None or ann["category_id"] not in category_index:
            kind, value = ("image_id", ann["image_id"]) if image is None else ("category_id", ann["category_id"])
            raise ValueError(f"{path}: annotations[{i}] has {kind} {value!r}, which no {kind[:-3]} lists")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_finite(v) for v in bbox):
            raise ValueError(f"{path}: annotations[{i}] has bbox {bbox!r}; expected 4 finite numbers [x, y, w, h]")
        x, y, w, h = bbox
        records.append((ann["image_id"], category_index[ann["category_id"]], x, y, x + w, y + h,
                        image["width"], image["height"], bool(ann.get("iscrowd", 0))))
    return {key: [r[k] for r in records] for k, key in enumerate(COCO_BOX_COLUMNS)}


def _url_maker(image_base: str):
    """file_name -> url under `image_base`: a URL prefix (scheme://...) or a local folder (file:// URLs)."""
    if "://" in image_base:
        return lambda name: image_base.rstrip("/") + "/" + quote(name)
    folder = Path(image_base).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"image_base={image_base!r} is neither a URL prefix (scheme://...) nor an existing folder")
    return lambda name: (folder / name).as_uri()


def _group_by_image(image_ids, categories, rel, groups) -> dict[object, list[dict]]:
    per_image: dict[object, list[dict]] = {}
    for image_id, box in zip(image_ids, _box_dicts(categories, rel, groups)):
        per_image.setdefault(image_id, []).append(box)
    return per_image


def coco_rows(instances_json_path: str | Path, image_base: str | None = None,
              min_object_area: float = 1e-5) -> tuple[pd.DataFrame, list[str], dict]:
    """COCO instances_*.json -> (rows: url, caption, width, height, boxes, image_id; class_names; counts).

    Class ids are 0..N-1 in ascending COCO category id order. `image_base` (URL prefix or local
    folder) joined with each file_name gives the url; without it, each image's coco_url. A dropped
    image counts under its first reason: no_boxes (none kept), then no_url.
    """
    _check_min_area(min_object_area)
    path = Path(instances_json_path)
    data = _read_coco(path)
    categories = _unique_ids(_checked_items(data["categories"], ("id", "name"), path, "categories"), path, "category")
    class_names = [str(categories[c]["name"]) for c in sorted(categories)]
    images = _coco_images(data, path)
    annotations = _checked_items(data["annotations"], ("image_id", "category_id", "bbox"), path, "annotations")
    box = _coco_box_arrays(annotations, images, {c: i for i, c in enumerate(sorted(categories))}, path)
    counts = _new_counts(("no_boxes", "no_url"), BOX_REASONS)
    per_image = _kept_boxes_by_image(box, COCO_PIXEL_TOLERANCE, min_object_area, counts)
    url_of = _url_maker(image_base) if image_base is not None else None
    rows = []
    for image in images.values():
        url = url_of(image["file_name"]) if url_of else image.get("coco_url")
        _add_row(rows, counts, per_image.get(image["id"], []), url, class_names,
                 {"width": image["width"], "height": image["height"], "image_id": image["id"]})
    return pd.DataFrame(rows, columns=["url", "caption", "width", "height", "boxes", "image_id"]), class_names, counts


def _kept_boxes_by_image(box: dict, tolerance: float, min_object_area: float, counts: dict) -> dict:
    """image id -> its kept boxes as dicts (in input order); dropped and clipped boxes are counted."""
    rel, reason, clipped = clip_boxes(box["x0"], box["y0"], box["x1"], box["y1"], box["width"], box["height"],
                                      tolerance, min_object_area)
    _count_box_drops(counts, reason, clipped)
    kept = reason == ""
    return _group_by_image(np.asarray(box["image_id"], dtype=object)[kept],
                           np.asarray(box["category"])[kept], rel[kept], np.asarray(box["group"], dtype=bool)[kept])


def _add_row(rows: list[dict], counts: dict, boxes: list[dict], url: str | None, class_names: list[str],
             columns: dict, no_url_reason: str = "no_url") -> None:
    """Append the image's row, or count why it has none: no kept box first, then no url."""
    reason = "no_boxes" if not boxes else no_url_reason if not url else None
    if reason:
        counts["dropped_images"][reason] += 1
        return
    rows.append({"url": url, "caption": _caption(boxes, class_names), "boxes": json.dumps(boxes), **columns})
    counts["boxes"] += len(boxes)
    counts["rows"] += 1


# ---------------------------------------------------------------------------------------------- OpenImages


def _read_csv(path: Path, what: str, columns: tuple[str, ...], **kwargs) -> pd.DataFrame:
    """Only `columns` of the CSV (OpenImages' train files hold millions of rows), checked on its header first."""
    try:
        found = list(pd.read_csv(path, nrows=0).columns)
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(f"OpenImages {what} CSV {path} lacks column(s) {missing}; found {found}")
        return pd.read_csv(path, usecols=list(columns), **kwargs)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"cannot read OpenImages {what} CSV {path}: {err}") from err


def _read_class_names(path: Path) -> dict[str, str]:
    """LabelName -> DisplayName; the official class-descriptions file has no header row, others may."""
    try:
        frame = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"cannot read OpenImages class descriptions CSV {path}: {err}") from err
    if frame.shape[1] < 2:
        raise ValueError(f"OpenImages class descriptions CSV {path} has {frame.shape[1]} column(s); "
                         "expected LabelName,DisplayName rows")
    if list(frame.iloc[0, :2]) == ["LabelName", "DisplayName"]:
        frame = frame.iloc[1:]
    return dict(zip(frame[0], frame[1]))


def _openimages_geometry(boxes: pd.DataFrame, path: Path, min_object_area: float):
    corners = {}
    for column in ("XMin", "YMin", "XMax", "YMax"):
        values = pd.to_numeric(boxes[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"{path}: column {column} holds a non-number on data row {bad[0] + 1} "
                             f"({boxes[column].iloc[bad[0]]!r}); coordinates must be finite numbers")
        corners[column] = values
    ones = np.ones(len(boxes))
    return clip_boxes(corners["XMin"], corners["YMin"], corners["XMax"], corners["YMax"], ones, ones,
                      RELATIVE_TOLERANCE, min_object_area)


def select_classes(labels: pd.Series, num_classes: int | None, path: Path) -> list[str]:
    """The num_classes most frequent labels by box count (ties by label), most frequent first; None: all."""
    freq = labels.value_counts().rename_axis("label").reset_index(name="n")
    ordered = freq.sort_values(["n", "label"], ascending=[False, True])["label"].tolist()
    if num_classes is None:
        return ordered
    if num_classes <= 0 or num_classes > len(ordered):
        raise ValueError(f"num_classes={num_classes}, but {path} has kept boxes of {len(ordered)} classes; "
                         f"set num_classes to 1..{len(ordered)} or None (all)")
    return ordered[:num_classes]


def _display_names(labels: list[str], names: dict[str, str], path: Path) -> list[str]:
    missing = [label for label in labels if label not in names]
    if missing:
        raise ValueError(f"class descriptions CSV {path} has no DisplayName for {len(missing)} label(s), e.g. "
                         f"{missing[:3]}; pass the class descriptions file of the same OpenImages version")
    return [names[label] for label in labels]


def openimages_rows(boxes_csv: str | Path, images_csv: str | Path, classes_csv: str | Path,
                    num_classes: int | None = None,
                    min_object_area: float = 1e-4) -> tuple[pd.DataFrame, list[str], dict]:
    """OpenImages V6/V7 bbox, image and class-description CSVs -> (rows: url, caption, boxes, image_id;
    class_names; counts).

    Rows follow the first appearance of each ImageID in the boxes CSV; url is the image's
    OriginalURL. Classes are chosen among the boxes that pass the geometric checks (boxes of other
    classes count as other_class). A dropped image counts under its first reason: no_boxes,
    not_in_images_csv, then no_url.
    """
    _check_min_area(min_object_area)
    boxes_csv, images_csv, classes_csv = Path(boxes_csv), Path(images_csv), Path(classes_csv)
    boxes = _read_csv(boxes_csv, "bbox annotations", OPENIMAGES_BOX_COLUMNS, dtype={"ImageID": str, "LabelName": str})
    images = _read_csv(images_csv, "images", ("ImageID", "OriginalURL"), dtype=str, keep_default_na=False)
    counts = _new_counts(("no_boxes", "not_in_images_csv", "no_url"), BOX_REASONS + ("other_class",))
    rel, reason, clipped = _openimages_geometry(boxes, boxes_csv, min_object_area)
    _count_box_drops(counts, reason, clipped)
    labels = select_classes(boxes["LabelName"][reason == ""], num_classes, boxes_csv)
    class_names = _display_names(labels, _read_class_names(classes_csv), classes_csv)
    category = boxes["LabelName"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    other = (reason == "") & pd.isna(category)
    counts["dropped_boxes"]["other_class"] = int(other.sum())
    kept = (reason == "") & ~other
    groups = pd.to_numeric(boxes["IsGroupOf"], errors="coerce").to_numpy() == 1
    per_image = _group_by_image(boxes["ImageID"].to_numpy()[kept], category[kept].astype(np.int64), rel[kept],
                                groups[kept])
    urls = {i: u.strip() for i, u in zip(images["ImageID"], images["OriginalURL"])}
    rows = []
    for image_id in dict.fromkeys(boxes["ImageID"]):
        _add_row(rows, counts, per_image.get(image_id, []), urls.get(image_id), class_names, {"image_id": image_id},
                 no_url_reason="no_url" if image_id in urls else "not_in_images_csv")
    return pd.DataFrame(rows, columns=["url", "caption", "boxes", "image_id"]), class_names, counts


# ---------------------------------------------------------------------------------------------- class folders


def class_folder_rows(root: str | Path) -> tuple[pd.DataFrame, list[str], dict]:
    """ImageNet-style root/CLASS_NAME/*.jpg|jpeg|png|webp -> (rows: url (file://), caption (the class
    name), label, class_name; class_names sorted; counts). Hidden entries (".name"), files outside a
    class folder, folders inside one and files of other types are skipped and counted."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"class folder root {root} is not an existing folder")
    entries = sorted(root.iterdir())
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        raise ValueError(f"{root} holds no class folders; expected root/CLASS_NAME/IMAGE.jpg")
    skipped = {"hidden": sum(p.name.startswith(".") for p in entries),
               "outside_class_folder": sum(not p.is_dir() and not p.name.startswith(".") for p in entries),
               "nested_folder": 0, "not_image": 0}
    rows = []
    for label, folder in enumerate(class_dirs):
        for file in sorted(folder.iterdir()):
            kind = "hidden" if file.name.startswith(".") else "nested_folder" if file.is_dir() \
                else None if file.suffix.lower() in IMAGE_SUFFIXES else "not_image"
            if kind:
                skipped[kind] += 1
                continue
            rows.append({"url": file.as_uri(), "caption": folder.name, "label": label, "class_name": folder.name})
    class_names = [p.name for p in class_dirs]
    per_class = pd.Series([r["label"] for r in rows], dtype=np.int64).value_counts()
    counts = {"rows": len(rows), "classes": len(class_names),
              "empty_classes": int(sum(per_class.get(i, 0) == 0 for i in range(len(class_names)))),
              "skipped": skipped}
    return pd.DataFrame(rows, columns=["url", "caption", "label", "class_name"]), class_names, counts
