"""LAION-style URL lists: reading, metadata filters and URL deduplication, before any download.

Inputs are parquet, CSV or JSON-lines files (or globs of them) with a url and a caption
column plus any others (LAION's similarity, pwatermark, punsafe, aesthetic, width, height).
Every dropped row is counted by reason; nothing here touches the network.
"""
import glob
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

READERS = {".parquet": pd.read_parquet, ".csv": pd.read_csv,
           ".jsonl": lambda p: pd.read_json(p, lines=True), ".json": lambda p: pd.read_json(p, lines=True)}


@dataclass
class Threshold:
    min: float | None = None
    max: float | None = None


@dataclass
class MetadataFilters:
    """Filters applied to the URL list (metadata) and, for sizes, again to the downloaded image."""
    min_width: int = 0               # pixels; metadata columns `width`/`height` where present,
    min_height: int = 0              # and the real (original) size after download
    max_aspect_ratio: float | None = None  # max(w/h, h/w); None: no limit
    min_caption_chars: int = 1       # an empty caption is never useful for text-to-image
    max_caption_chars: int = 1000
    thresholds: dict[str, Threshold] = field(default_factory=dict)  # e.g. punsafe: {max: 0.5}


def expand_inputs(patterns: list[str]) -> list[Path]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) if any(c in str(pattern) for c in "*?[") else [pattern]
        if not matches:
            raise ValueError(f"input pattern {pattern!r} matches no file; fix `inputs`")
        files += [Path(m) for m in matches]
    for f in files:
        if f.suffix not in READERS:
            raise ValueError(f"input {f} has an unsupported extension; use one of {sorted(READERS)}")
        if not f.is_file():
            raise ValueError(f"input {f} does not exist or is not a file; fix `inputs`")
    return files


def read_url_list(path: Path, url_col: str, caption_col: str) -> pd.DataFrame:
    """One input file as a frame with `url` and `caption` columns first, other columns kept."""
    try:
        frame = READERS[path.suffix](path)
    except Exception as err:  # any parser error: the file is unreadable as its extension says
        raise ValueError(f"cannot read URL list {path}: {err}") from err
    missing = [c for c in (url_col, caption_col) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; found {list(frame.columns)}. Map them with "
                         f"url_col=... and caption_col=... (now url_col={url_col!r}, caption_col={caption_col!r})")
    frame = frame.rename(columns={url_col: "url", caption_col: "caption"})
    return frame[["url", "caption"] + [c for c in frame.columns if c not in ("url", "caption")]]


def read_url_lists(patterns: list[str], url_col: str, caption_col: str, map_col: str | None = None) -> pd.DataFrame:
    """Every input file as one frame; with `map_col` (semantic maps), each file must hold that column."""
    frames = []
    for path in expand_inputs(patterns):
        frames.append(read_url_list(path, url_col, caption_col))
        if map_col is not None and map_col not in frames[-1].columns:
            raise ValueError(f"{path} lacks the segmentation map column {map_col!r} (map_col); "
                             f"found {list(frames[-1].columns)}")
    return pd.concat(frames, ignore_index=True)


def normalise_url(url: str) -> str:
    """Scheme and host lower-cased, default port and fragment dropped, surrounding spaces stripped."""
    parts = urlsplit(str(url).strip())
    host = (parts.hostname or "").lower()
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if parts.port in (None, default) else f"{host}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce")


def filter_masks(frame: pd.DataFrame, filters: MetadataFilters) -> dict[str, pd.Series]:
    """reason -> boolean mask of the rows that reason drops (a row is counted under its first reason)."""
    caption = frame["caption"].fillna("").astype(str).str.strip()
    masks = {"missing_url": frame["url"].isna() | (frame["url"].astype(str).str.strip() == ""),
             "caption_too_short": caption.str.len() < filters.min_caption_chars,
             "caption_too_long": caption.str.len() > filters.max_caption_chars}
    if {"width", "height"} <= set(frame.columns):
        w, h = _numeric(frame, "width"), _numeric(frame, "height")
        masks["too_small"] = (w < filters.min_width) | (h < filters.min_height)
        if filters.max_aspect_ratio is not None:
            masks["aspect_ratio"] = pd.concat([w / h, h / w], axis=1).max(axis=1) > filters.max_aspect_ratio
    for column, bound in filters.thresholds.items():
        if column not in frame.columns:
            raise ValueError(f"filters.thresholds names column {column!r}, which the URL list lacks; "
                             f"columns are {list(frame.columns)}")
        values = _numeric(frame, column)
        low = values < bound.min if bound.min is not None else False
        high = values > bound.max if bound.max is not None else False
        masks[f"{column}_out_of_range"] = values.isna() | low | high
    return {k: pd.Series(v, index=frame.index).fillna(False).astype(bool) for k, v in masks.items()}


def apply_filters(frame: pd.DataFrame, filters: MetadataFilters) -> tuple[pd.DataFrame, dict[str, int]]:
    dropped, counts = pd.Series(False, index=frame.index), {}
    for reason, mask in filter_masks(frame, filters).items():
        counts[reason] = int((mask & ~dropped).sum())
        dropped |= mask
    return frame[~dropped].reset_index(drop=True), counts


def dedup_urls(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row of every normalised URL."""
    duplicated = frame["url"].map(normalise_url).duplicated()
    return frame[~duplicated].reset_index(drop=True), int(duplicated.sum())
