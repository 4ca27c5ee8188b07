"""WebDataset tar shards: read samples robustly, write shards atomically.

A sample is a dict `{"__key__": key, ext: bytes, ...}` as webdataset has it. Writers write
`NAME.tmp-PID` and rename it when complete, so a killed process never leaves a shard that
looks finished.
"""
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yields a new empty folder `.NAME.tmp-PID` beside `folder` to write into; when the block ends
    without an error it replaces `folder` as a whole (a reader sees the old or the new one, never a
    mix, and a killed writer leaves only the hidden temporary). On an error it is removed."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def iter_samples(path: str | Path, errors: dict[str, int] | None = None) -> Iterator[dict]:
    """Samples of a tar shard grouped by key; a truncated or corrupt tar ends the iteration and
    is counted under errors["truncated_tar"] instead of raising."""
    current: dict = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if current and key != current["__key__"]:
                    yield current
                    current = {}
                current["__key__"] = key
                current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        if errors is not None:
            errors["truncated_tar"] = errors.get("truncated_tar", 0) + 1
        return  # the partial last sample is dropped: it may lack files
    if current:
        yield current


def write_shard(path: str | Path, samples: Iterable[dict]) -> int:
    """Write samples to a tar (files in key order, as webdataset expects); returns the count."""
    buffer, count = io.BytesIO(), 0
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
            count += 1
    atomic_write_bytes(path, buffer.getvalue())
    return count
