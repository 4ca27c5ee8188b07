"""Ingest: LAION-style URL lists -> img2dataset on Ray -> filtered, deduplicated WebDataset shards.

1. plan (driver): read the URL lists, filter on metadata, drop repeated URLs, split into input
   parts of `part_size` rows under `_work/parts/` (written once; a rerun checks they match);
2. download: img2dataset with its Ray distributor, one Ray task per part, into `_work/raw/`
   (its incremental mode skips parts already downloaded);
3. finalize: one Ray task per raw shard (pipeline.ingest.part): real-size filters and content
   deduplication against a registry actor seeded from earlier runs, with `map_col` each kept
   sample's segmentation map (pipeline.ingest.maps), written atomically as
   `NNNNN.tar / .parquet / _stats.json` in the output folder;
4. `retry_failed`: rows that failed for transient reasons become new parts, downloaded and
   finalized as new shards; the original rows are marked `retried`;
5. summary: counts by reason from every shard's parquet, to `ingest_summary.json`.
"""
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.ingest.maps import RESIZE_ONLY_IF_BIGGER, MapSettings
from pipeline.ingest.part import (
    TRANSIENT_REASONS,
    final_paths,
    finalize_shard,
    is_finished,
)
from pipeline.ingest.url_lists import (
    MetadataFilters,
    apply_filters,
    dedup_urls,
    expand_inputs,
    read_url_lists,
)
from pipeline.ray_cluster import RayConfig, init_ray
from pipeline.shards import atomic_write_bytes, atomic_write_json

# Layout boxes (jobs.url_list) are relative to the whole picture: only resize modes that keep all of it keep them right.
BOXES_COLUMN, BOX_RESIZE_MODES = "boxes", ("keep_ratio", "keep_ratio_largest", "no")
# Columns img2dataset writes itself; input columns of these names are kept as source_<name>.
IMG2DATASET_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width", "original_height",
                       "exif", "sha256", "md5")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=list)  # parquet / csv / jsonl files or globs
    output_dir: str = ""
    url_col: str = "url"
    caption_col: str = "caption"
    image_size: int = 256
    resize_mode: str = "center_crop"
    encode_format: str = "jpg"
    encode_quality: int = 95
    part_size: int = 10_000            # rows per input part = per shard; one Ray task each
    thread_count: int = 32             # download threads per task
    timeout_s: float = 10.0
    retries: int = 0                   # img2dataset's immediate retries per URL
    filters: MetadataFilters = field(default_factory=MetadataFilters)
    dedup_urls: bool = True
    dedup_content: bool = True
    retry_failed: bool = False
    map_col: str | None = None         # segmentation map per row: http(s) URL or file path; None: no maps
    map_dir: str | None = None         # folder for relative map paths; None: the driver's working directory
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        checks = [(bool(self.inputs), "inputs must list at least one URL list file (inputs=[a.parquet])"),
                  (bool(self.output_dir), "set output_dir to the folder for the shards"),
                  (self.resize_mode in RESIZE_MODES, f"resize_mode must be one of {RESIZE_MODES}"),
                  (self.encode_format in ENCODE_FORMATS, f"encode_format must be one of {ENCODE_FORMATS}"),
                  (0 < self.encode_quality <= 100, "encode_quality must be in 1..100"),
                  (self.part_size > 0 and self.image_size > 0, "part_size and image_size must be positive"),
                  (self.map_col not in (self.url_col, self.caption_col),
                   "map_col must name its own column, not url_col or caption_col"),
                  (self.map_dir is None or self.map_col is not None,
                   "map_dir is set but map_col is not: set map_col=COLUMN (the map paths) or drop map_dir"),
                  (self.map_dir is None or Path(self.map_dir).is_dir(),
                   f"map_dir={self.map_dir!r} is not an existing folder")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _work(cfg: IngestConfig) -> Path:
    return Path(cfg.output_dir) / "_work"


def _fingerprint(cfg: IngestConfig) -> str:
    """What the parts depend on: input files (name, size) and the settings applied before download."""
    files = [(str(f), f.stat().st_size) for f in expand_inputs(cfg.inputs)]
    keys = (files, cfg.url_col, cfg.caption_col, asdict(cfg.filters), cfg.dedup_urls, cfg.part_size, cfg.map_col,
            cfg.map_dir)
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def plan_parts(cfg: IngestConfig) -> dict:
    """Write the input parts once; a rerun with the same inputs reuses them, other inputs fail."""
    plan_path, fingerprint = _work(cfg) / "plan.json", _fingerprint(cfg)
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if plan["fingerprint"] != fingerprint:
            raise ValueError(f"{cfg.output_dir} holds an ingest of other inputs or filters; "
                             "choose another output_dir or delete that one")
        return plan
    frame = read_url_lists(cfg.inputs, cfg.url_col, cfg.caption_col, cfg.map_col)
    if BOXES_COLUMN in frame.columns and cfg.resize_mode not in BOX_RESIZE_MODES:
        raise ValueError(f"the URL list has a {BOXES_COLUMN!r} column (boxes relative to the whole picture, "
                         f"jobs.url_list) but resize_mode={cfg.resize_mode!r} cuts or pads the picture, so the boxes "
                         f"would no longer fit it: set resize_mode to one of {BOX_RESIZE_MODES}")
    kept, dropped = apply_filters(frame, cfg.filters)
    kept, url_dupes = dedup_urls(kept) if cfg.dedup_urls else (kept, 0)
    kept = kept.rename(columns={c: saved_column(c) for c in IMG2DATASET_COLUMNS})
    num_parts = _write_parts(kept, _work(cfg) / "parts", cfg.part_size)
    plan = {"fingerprint": fingerprint, "input_rows": len(frame), "filtered_before_download": dropped,
            "duplicate_urls": url_dupes, "num_parts": num_parts, "columns": list(kept.columns)}
    atomic_write_json(plan_path, plan)
    return plan


def saved_column(name: str) -> str:
    """An input column's name in the parts and in each sample's json."""
    return f"source_{name}" if name in IMG2DATASET_COLUMNS else name


def map_settings(cfg: IngestConfig) -> MapSettings | None:
    """What finalize needs to add each sample's segmentation map; None without `map_col`."""
    if cfg.map_col is None:
        return None
    # Absolute: Ray workers need not share the driver's working directory.
    map_dir = str(Path(cfg.map_dir or ".").resolve())
    return MapSettings(column=saved_column(cfg.map_col), map_dir=map_dir, timeout_s=cfg.timeout_s,
                       image_size=cfg.image_size, resize_mode=cfg.resize_mode)


def download(cfg: IngestConfig, parts_dir: Path, raw_dir: Path, columns: list[str]) -> None:
    """img2dataset over every part not yet downloaded: its Ray distributor, one task per part."""
    from img2dataset import download as img2dataset_download

    img2dataset_download(
        url_list=str(parts_dir), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=[c for c in columns if c not in ("url", "caption")] or None,
        output_folder=str(raw_dir), output_format="webdataset", number_sample_per_shard=cfg.part_size,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=RESIZE_ONLY_IF_BIGGER,
        encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, thread_count=cfg.thread_count,
        timeout=cfg.timeout_s,
        retries=cfg.retries, compute_hash="sha256", distributor="ray", processes_count=1,
        incremental_mode="incremental", enable_wandb=False)


def _owned_hashes(out_dir: Path) -> dict[str, int]:
    owners = {}
    for path in sorted(out_dir.glob("[0-9][0-9][0-9][0-9][0-9]_stats.json")):
        shard = int(path.name[:5])
        rows = pd.read_parquet(final_paths(out_dir, shard)["parquet"], columns=["status", "sha256"])
        owners.update({h: shard for h in rows.loc[rows["status"] == "success", "sha256"]})
    return owners


def finalize_all(ray, cfg: IngestConfig, raw_dir: Path, id_map: dict[int, int], extra: dict) -> list[dict]:
    """One Ray task per raw shard; content claims go through one registry actor."""
    from tqdm import tqdm

    out_dir = Path(cfg.output_dir)
    registry = ContentRegistry(ray).remote(_owned_hashes(out_dir)) if cfg.dedup_content else None
    task = ray.remote(num_cpus=1)(_finalize_task)
    maps = map_settings(cfg)
    pending = [task.remote(str(raw_dir), raw_id, str(out_dir), shard_id, cfg.filters, maps, registry, extra)
               for raw_id, shard_id in id_map.items() if not is_finished(out_dir, shard_id)]
    stats = []
    with tqdm(total=len(pending), desc="finalize shards", unit="shard") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            stats += ray.get(done)
            bar.update(len(done))
    return stats


def _finalize_task(raw_dir, raw_id, out_dir, shard_id, filters, maps, registry, extra):
    import ray

    claim = (lambda hashes: ray.get(registry.claim.remote(shard_id, hashes))) if registry else None
    extra = {**extra, "node": ray.get_runtime_context().get_node_id()}
    stats = finalize_shard(Path(raw_dir), raw_id, Path(out_dir), shard_id, filters, claim, extra, maps)
    for suffix in (".tar", ".parquet"):  # the final shard replaces the raw one; its json stays as
        Path(raw_dir, f"{raw_id:05d}{suffix}").unlink(missing_ok=True)  # img2dataset's done marker
    return stats


def ContentRegistry(ray):  # noqa: N802 (a class factory: the actor class needs ray imported)
    @ray.remote(num_cpus=0)
    class _ContentRegistry:
        """First come owns a picture (sha256 of its bytes); later shards drop their copies."""

        def __init__(self, owners: dict[str, int]):
            self.owners = owners

        def claim(self, shard_id: int, hashes: list[str]) -> list[bool]:
            return [self.owners.setdefault(h, shard_id) == shard_id for h in hashes]
    return _ContentRegistry


def _final_shards(out_dir: Path) -> list[int]:
    return sorted(int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]_stats.json"))


def _write_parts(frame: pd.DataFrame, parts_dir: Path, part_size: int) -> int:
    parts_dir.mkdir(parents=True, exist_ok=True)
    num_parts = max(1, -(-len(frame) // part_size))
    for i in range(num_parts):
        atomic_write_bytes(parts_dir / f"{i:05d}.parquet",
                           frame.iloc[i * part_size:(i + 1) * part_size].to_parquet(index=False))
    return num_parts


def _start_retry_round(cfg: IngestConfig, columns: list[str]) -> Path | None:
    """Collect transient failures into a new round's parts; None when there is nothing to retry."""
    out_dir, sources, frames = Path(cfg.output_dir), {}, []
    for shard in _final_shards(out_dir):
        rows = pd.read_parquet(final_paths(out_dir, shard)["parquet"])
        mask = (rows["status"] == "failed_to_download") & rows["reason"].isin(TRANSIENT_REASONS)
        if mask.any():
            sources[shard] = rows.loc[mask, "key"].tolist()
            frames.append(rows.loc[mask, columns])
    if not frames:
        return None
    round_dir = _work(cfg) / f"retry_{len(list(_work(cfg).glob('retry_*'))):03d}"
    num_parts = _write_parts(pd.concat(frames, ignore_index=True), round_dir / "parts", cfg.part_size)
    first_id = max(_final_shards(out_dir)) + 1
    atomic_write_json(round_dir / "round.json", {"first_shard": first_id, "num_parts": num_parts, "sources": sources})
    return round_dir


def _finish_retry_round(ray, cfg: IngestConfig, round_dir: Path, columns: list[str]) -> None:
    """Download and finalize the round (resumable), then mark the retried rows in their shards."""
    spec = json.loads((round_dir / "round.json").read_text())
    download(cfg, round_dir / "parts", round_dir / "raw", columns)
    id_map = {j: spec["first_shard"] + j for j in range(spec["num_parts"])}
    finalize_all(ray, cfg, round_dir / "raw", id_map, {"retry_of": round_dir.name})
    for shard, keys in spec["sources"].items():
        path = final_paths(Path(cfg.output_dir), int(shard))["parquet"]
        rows = pd.read_parquet(path)
        rows.loc[rows["key"].isin(keys), "status"] = "retried"
        atomic_write_bytes(path, rows.to_parquet(index=False))
    atomic_write_json(round_dir / "done.json", {"finished": True})


def retry_failed(ray, cfg: IngestConfig, columns: list[str]) -> None:
    unfinished = [d for d in sorted(_work(cfg).glob("retry_*")) if not (d / "done.json").exists()]
    round_dir = unfinished[0] if unfinished else _start_retry_round(cfg, columns)
    if round_dir is not None:
        _finish_retry_round(ray, cfg, round_dir, columns)


def summarize(cfg: IngestConfig, plan: dict, seconds: float) -> dict:
    out_dir = Path(cfg.output_dir)
    shards = _final_shards(out_dir)
    rows = pd.concat([pd.read_parquet(final_paths(out_dir, s)["parquet"], columns=["status", "reason"])
                      for s in shards], ignore_index=True)
    by_reason = lambda status: rows.loc[rows["status"] == status, "reason"].value_counts().to_dict()  # noqa: E731
    status = rows["status"].value_counts()
    summary = {
        "input_rows": plan["input_rows"], "filtered_before_download": plan["filtered_before_download"],
        "duplicate_urls": plan["duplicate_urls"], "downloaded": int(status.get("success", 0)),
        "failed_to_download": by_reason("failed_to_download"), "failed_to_resize": by_reason("failed_to_resize"),
        "filtered_after_download": by_reason("filtered"), "failed_map": by_reason("failed_map"),
        "duplicate_content": int(status.get("duplicate_content", 0)), "retried": int(status.get("retried", 0)),
        "shards": len(shards), "seconds": round(seconds, 2),
        "images_per_s": round(int(status.get("success", 0)) / max(seconds, 1e-9), 2)}
    atomic_write_json(out_dir / "ingest_summary.json", summary)
    return summary


def _forget_lost_raw_shards(raw_dir: Path, raw_ids) -> None:
    """A raw shard marked done whose files are gone (its final shard was deleted): download it again."""
    for i in raw_ids:
        if not (raw_dir / f"{i:05d}.parquet").exists():
            (raw_dir / f"{i:05d}_stats.json").unlink(missing_ok=True)


def ingest(cfg: IngestConfig) -> dict:
    """Run (or resume) the whole stage; returns the summary."""
    start = time.perf_counter()
    plan = plan_parts(cfg)  # reads and validates every input before any download
    ray = init_ray(cfg.ray)
    out_dir, work = Path(cfg.output_dir), _work(cfg)
    todo = {i: i for i in range(plan["num_parts"]) if not is_finished(out_dir, i)}
    if todo:
        _forget_lost_raw_shards(work / "raw", todo)
        download(cfg, work / "parts", work / "raw", plan["columns"])
        finalize_all(ray, cfg, work / "raw", todo, {})
    if cfg.retry_failed:
        retry_failed(ray, cfg, plan["columns"])
    return summarize(cfg, plan, time.perf_counter() - start)
