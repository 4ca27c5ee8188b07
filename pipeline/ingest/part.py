"""The per-shard core of ingest: img2dataset's raw shard -> filtered, deduplicated final shard.

Pure of Ray: content-hash claims come through a callable, so tests run it directly and
`pipeline.ingest.stage` runs it as one Ray task per shard. Every input row of the shard ends up in
the final `NNNNN.parquet` with a status: success, failed_to_download, failed_to_resize,
filtered (with its reason), duplicate_content or, when segmentation maps are ingested,
failed_map (with its reason, see pipeline.ingest.maps); the tar holds only the successes, each
with its `seg.png` when maps are ingested.
"""
import json
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline.ingest.maps import MapSettings, segmentation_png
from pipeline.ingest.url_lists import MetadataFilters
from pipeline.shards import (
    atomic_write_bytes,
    atomic_write_json,
    iter_samples,
    write_shard,
)

# Failures worth downloading again: the server may answer next time. 404s and decode errors are not.
TRANSIENT_REASONS = ("timeout", "connection", "http_5xx", "http_429")


def failure_reason(status: str, message: str | None) -> str:
    """A short, countable reason for one of img2dataset's failure messages."""
    message = message or ""
    if status == "failed_to_resize":
        return "decode_error" if "decoding" in message.lower() else "resize_error"
    if m := re.search(r"HTTP Error (\d)(\d\d)", message):
        code = m.group(1) + m.group(2)
        return f"http_{code}" if code in ("404", "429") else f"http_{m.group(1)}xx"
    if "timed out" in message or "timeout" in message.lower():
        return "timeout"
    if any(s in message for s in ("Connection refused", "Connection reset", "Remote end closed", "urlopen error")):
        return "connection"
    return "other"


def size_filter_reason(meta: dict, filters: MetadataFilters) -> str | None:
    """Post-download check on the real (original) image size."""
    w, h = meta.get("original_width") or 0, meta.get("original_height") or 0
    if w < filters.min_width or h < filters.min_height:
        return "too_small"
    if filters.max_aspect_ratio is not None and min(w, h) > 0 and max(w / h, h / w) > filters.max_aspect_ratio:
        return "aspect_ratio"
    return None


def final_paths(out_dir: Path, shard_id: int) -> dict[str, Path]:
    stem = f"{shard_id:05d}"
    return {"tar": out_dir / f"{stem}.tar", "parquet": out_dir / f"{stem}.parquet",
            "stats": out_dir / f"{stem}_stats.json"}


def is_finished(out_dir: Path, shard_id: int) -> bool:
    """The stats file is written last: its presence means the shard is complete."""
    return final_paths(out_dir, shard_id)["stats"].exists()


def _keep_or_drop(sample: dict, filters: MetadataFilters, seen: set[str],
                  maps: MapSettings | None) -> tuple[str, str | None]:
    """Status and reason of a downloaded sample; a kept one gets its `seg.png` when maps are set."""
    meta = json.loads(sample["json"])
    if reason := size_filter_reason(meta, filters):
        return "filtered", reason
    if meta.get("sha256") in seen:
        return "duplicate_content", None
    # After the duplicate check: no fetch for a dropped copy; before `seen`: a failed map leaves
    # the picture to a later copy in this shard.
    if maps is not None:
        seg, reason = segmentation_png(sample, maps)
        if reason:
            return "failed_map", reason
        sample["seg.png"] = seg
    seen.add(meta.get("sha256"))
    return "success", None


def finalize_shard(raw_dir: Path, raw_id: int, out_dir: Path, shard_id: int, filters: MetadataFilters,
                   claim: Callable[[list[str]], list[bool]] | None, extra: dict | None = None,
                   maps: MapSettings | None = None) -> dict:
    """Filter and deduplicate raw shard `raw_id` into final shard `shard_id` (rows and samples in key
    order); returns its stats.

    `claim(hashes)` answers, per hash, whether this shard owns it (first come across all shards
    and earlier runs); None disables content deduplication across shards. `maps`: add each kept
    sample's segmentation map as `seg.png` (None: no maps).
    """
    # img2dataset writes samples as its download threads finish them: in another order every run.
    # Key order is input order, so that the same URL list gives byte-identical shards (and a
    # training run the same data order) every time.
    raw = pd.read_parquet(raw_dir / f"{raw_id:05d}.parquet").sort_values("key", ignore_index=True)
    errors: dict[str, int] = {}
    samples = {s["__key__"]: s for s in iter_samples(raw_dir / f"{raw_id:05d}.tar", errors)}
    hashes = [json.loads(s["json"]).get("sha256") for s in samples.values()]
    owned = dict(zip(hashes, claim(hashes))) if claim else {}
    seen = {h for h, mine in owned.items() if not mine}  # pictures another shard kept
    raw["reason"] = [failure_reason(s, m) if s != "success" else None
                     for s, m in zip(raw["status"], raw["error_message"])]
    kept = []
    for i, key in enumerate(raw["key"]):
        if raw.at[i, "status"] != "success":
            continue
        if key not in samples:  # lost with a truncated raw tar
            raw.loc[i, ["status", "reason"]] = ["failed_to_resize", "truncated_tar"]
            continue
        status, reason = _keep_or_drop(samples[key], filters, seen, maps)
        raw.loc[i, ["status", "reason"]] = [status, reason]
        if status == "success":
            kept.append(samples[key])
    return _write_final(out_dir, shard_id, raw, kept, errors, extra or {})


def _write_final(out_dir: Path, shard_id: int, rows: pd.DataFrame, kept: list[dict], errors: dict,
                 extra: dict) -> dict:
    paths = final_paths(out_dir, shard_id)
    write_shard(paths["tar"], kept)
    atomic_write_bytes(paths["parquet"], rows.to_parquet(index=False))
    stats = {"shard": shard_id, "count": len(rows), "successes": len(kept), **shard_counts(rows), **extra,
             "raw_errors": errors}
    atomic_write_json(paths["stats"], stats)  # last: marks the shard finished
    return stats


def shard_counts(rows: pd.DataFrame) -> dict:
    """Counts by status, and by reason within each failure status."""
    counts = {"status": rows["status"].value_counts().to_dict()}
    for status in ("failed_to_download", "failed_to_resize", "filtered", "failed_map"):
        counts[status] = rows.loc[rows["status"] == status, "reason"].value_counts().to_dict()
    return counts
