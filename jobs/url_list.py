"""`python -m jobs.url_list {coco,openimages,folders} ... --out LIST.parquet`: annotations -> an ingest URL list.

    python -m jobs.url_list coco annotations/instances_train2017.json --image-base train2017/ --out coco/urls.parquet
    python -m jobs.url_list openimages --boxes oidv6-train-annotations-bbox.csv \\
        --images train-images-boxable-with-rotation.csv --classes class-descriptions-boxable.csv \\
        --num-classes 300 --out oi/urls.parquet
    python -m jobs.url_list folders imagenet/train --out imagenet/urls.parquet

Writes LIST.parquet and `classes.txt` beside it (line i: the name of class id i), each atomically
(temp file + rename), and prints one JSON line of counts (kept rows and boxes, drops by reason).
Then: `python -m jobs.ingest inputs=[LIST.parquet] output_dir=...`, for COCO and OpenImages lists with
`resize_mode=keep_ratio` (or `no`): the boxes are relative to the whole picture, which ingest's default
center_crop (and border's padding) would change. Row formats: pipeline/ingest/sources.py.

A plain argparse CLI, not a Hydra app like the other jobs: it has one command per source format
and no settings worth a config group.
"""
import argparse
import json
from pathlib import Path

import pandas as pd

from pipeline.ingest.sources import class_folder_rows, coco_rows, openimages_rows
from pipeline.shards import atomic_write_bytes


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.url_list", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = ap.add_subparsers(dest="source", required=True)
    coco = sources.add_parser("coco", help="a COCO instances_*.json")
    coco.add_argument("instances_json", type=Path)
    coco.add_argument("--image-base", default=None,
                      help="URL prefix or local folder of the images (default: each image's coco_url)")
    coco.add_argument("--min-object-area", type=float, default=1e-5, help="drop smaller boxes (image fraction)")
    oi = sources.add_parser("openimages", help="OpenImages V6/V7 bbox, image and class-description CSVs")
    oi.add_argument("--boxes", type=Path, required=True, help="bbox annotations CSV")
    oi.add_argument("--images", type=Path, required=True, help="images CSV (ImageID, OriginalURL, ...)")
    oi.add_argument("--classes", type=Path, required=True, help="class descriptions CSV (LabelName,DisplayName)")
    oi.add_argument("--num-classes", type=_optional_int, default=None,
                    help="keep the N most frequent classes (default: all)")
    oi.add_argument("--min-object-area", type=float, default=1e-4, help="drop smaller boxes (image fraction)")
    folders = sources.add_parser("folders", help="an ImageNet-style tree ROOT/CLASS_NAME/*.jpg")
    folders.add_argument("root", type=Path)
    for sub in (coco, oi, folders):
        sub.add_argument("--out", type=Path, required=True, help="the URL list to write (.parquet)")
    return ap


def convert(args: argparse.Namespace) -> tuple[pd.DataFrame, list[str], dict]:
    if args.source == "coco":
        return coco_rows(args.instances_json, args.image_base, args.min_object_area)
    if args.source == "openimages":
        return openimages_rows(args.boxes, args.images, args.classes, args.num_classes, args.min_object_area)
    return class_folder_rows(args.root)


def write_url_list(rows: pd.DataFrame, class_names: list[str], out: Path) -> Path:
    """LIST.parquet and classes.txt beside it, both atomically; returns the classes.txt path."""
    bad = [name for name in class_names if "\n" in name or "\r" in name]
    if bad:
        raise ValueError(f"class name(s) {bad[:3]} hold a line break; classes.txt holds one name per line")
    out.parent.mkdir(parents=True, exist_ok=True)
    classes_txt = out.with_name("classes.txt")
    atomic_write_bytes(classes_txt, "".join(f"{name}\n" for name in class_names).encode())
    atomic_write_bytes(out, rows.to_parquet(index=False))
    return classes_txt


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.out.suffix != ".parquet":
        ap.error(f"--out {args.out} must end in .parquet (jobs.ingest reads a list by its extension)")
    try:
        rows, class_names, counts = convert(args)
        if rows.empty:
            raise ValueError(f"no image was kept, nothing to write to {args.out}; counts: {json.dumps(counts)}")
        classes_txt = write_url_list(rows, class_names, args.out)
    except ValueError as err:
        ap.error(str(err))
    result = {"source": args.source, "out": str(args.out), "classes_txt": str(classes_txt),
              "num_classes": len(class_names), **counts}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
