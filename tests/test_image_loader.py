"""pipeline/image_loader.py: decoding, skipping, rank/worker splits and exact resume."""
import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.image_loader import (ImageDataConfig, ImageShardLoader, decode_image, iter_eval_batches,
                                   list_shards, split_train_eval)
from pipeline.shards import write_shard


def _png(value: int, size: tuple[int, int] = (20, 12)) -> bytes:
    """A flat image whose pixel value identifies the sample."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format="PNG")  # lossless: exact ids
    return buffer.getvalue()


def write_id_shards(folder: Path, num_shards: int, per_shard: int) -> Path:
    """Shards of flat images; sample id = shard * per_shard + i, stored as the pixel value."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        samples = [{"__key__": f"{shard:05d}{i:04d}", "png": _png(shard * per_shard + i),
                    "txt": b"caption", "json": json.dumps({"id": shard * per_shard + i}).encode()}
                   for i in range(per_shard)]
        write_shard(folder / f"{shard:05d}.tar", samples)
    return folder


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def cfg_for(path: Path, **overrides) -> ImageDataConfig:
    return ImageDataConfig(**{"path": str(path), "resolution": 8, "batch_size": 4, "num_workers": 0,
                              "shuffle_buffer": 8, **overrides})


def test_decode_resizes_the_shorter_side_and_crops():
    image = decode_image(_png(7, (40, 20)), 10, "center")
    assert image.shape == (3, 10, 10) and image.dtype == np.uint8 and (image == 7).all()
    rng = np.random.default_rng(0)
    assert decode_image(_png(7, (5, 5)), 10, "random", rng).shape == (3, 10, 10)  # upscaled


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    good = [{"__key__": f"{i:09d}", "png": _png(i), "txt": b"c"} for i in range(6)]
    bad = [{"__key__": "100000000", "jpg": b"not a jpeg", "txt": b"c"},
           {"__key__": "100000001", "txt": b"caption without image"}]
    write_shard(tmp_path / "00000.tar", good[:3] + bad + good[3:])
    loader = ImageShardLoader(list_shards(str(tmp_path)), cfg_for(tmp_path, batch_size=3, shuffle_buffer=0))
    batches = list(islice(loader, 2))
    assert [ids(b) for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert loader.skipped == {"corrupt_image": 1, "missing_image": 1, "truncated_tar": 0, "tar_error": 0}


def test_truncated_tar_ends_its_shard_and_is_counted(tmp_path):
    write_id_shards(tmp_path, 2, 6)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:len(data) // 2 + 100])
    batches = list(iter_eval_batches(list_shards(str(tmp_path)), 8, 100))
    got = ids(torch.cat(batches))
    assert got[:6] == list(range(6)) and 6 <= len(got) < 12
    loader = ImageShardLoader(list_shards(str(tmp_path)), cfg_for(tmp_path, batch_size=2, shuffle_buffer=0))
    list(islice(loader, 8))
    assert loader.skipped["truncated_tar"] >= 1


def test_held_out_shards_are_never_trained_on(tmp_path):
    write_id_shards(tmp_path, 3, 4)
    train, held_out = split_train_eval(cfg_for(tmp_path, num_eval_shards=1))
    assert [Path(s).name for s in train] == ["00000.tar", "00001.tar"] and Path(held_out[0]).name == "00002.tar"
    with pytest.raises(ValueError, match="num_eval_shards"):
        split_train_eval(cfg_for(tmp_path, num_eval_shards=3))
    with pytest.raises(ValueError, match="no .tar shards"):
        list_shards(str(tmp_path / "missing"))


@pytest.mark.parametrize("num_shards", [8, 2])  # by shard, and by sample when shards < ranks x workers
def test_ranks_and_workers_split_every_epoch_exactly_once(tmp_path, num_shards):
    per_shard = 48 // num_shards
    write_id_shards(tmp_path, num_shards, per_shard)
    seen = []
    for rank in range(2):
        loader = ImageShardLoader(list_shards(str(tmp_path)), cfg_for(tmp_path, num_workers=2), rank, 2)
        seen += [i for b in islice(loader, 6) for i in ids(b)]  # 2 ranks x 6 batches x 4 = one epoch
    assert sorted(seen) == list(range(48))


def test_order_depends_on_seed_and_epoch(tmp_path):
    write_id_shards(tmp_path, 4, 8)
    shards = list_shards(str(tmp_path))

    def first_epochs(seed):
        return [i for b in islice(ImageShardLoader(shards, cfg_for(tmp_path, seed=seed)), 16) for i in ids(b)]
    a, b = first_epochs(0), first_epochs(1)
    assert a == first_epochs(0)
    assert a != b and sorted(a[:32]) == sorted(b[:32]) == list(range(32))
    assert a[:32] != a[32:]  # epoch 2 is reshuffled


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 8, 11])  # mid-epoch, at the epoch boundary (32 / 4), past it
def test_resume_reproduces_the_uninterrupted_batches(tmp_path, num_workers, cut):
    write_id_shards(tmp_path, 4, 8)
    shards = list_shards(str(tmp_path))
    cfg = cfg_for(tmp_path, num_workers=num_workers, crop="random", resolution=6)
    straight = list(islice(ImageShardLoader(shards, cfg), 20))
    first = ImageShardLoader(shards, cfg)
    head = list(islice(first, cut))
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a file
    resumed = ImageShardLoader(shards, cfg)
    resumed.load_state_dict(state)
    tail = list(islice(resumed, 20 - cut))
    assert all(torch.equal(a, b) for a, b in zip(straight, head + tail, strict=True))


def test_resume_with_another_worker_count_is_refused(tmp_path):
    write_id_shards(tmp_path, 2, 4)
    loader = ImageShardLoader(list_shards(str(tmp_path)), cfg_for(tmp_path, num_workers=2))
    other = ImageShardLoader(list_shards(str(tmp_path)), cfg_for(tmp_path, num_workers=0))
    with pytest.raises(ValueError, match="num_workers=2"):
        other.load_state_dict(loader.state_dict())


def test_eval_batches_split_ranks_and_ignore_batch_size(tmp_path):
    write_id_shards(tmp_path, 2, 5)
    shards = list_shards(str(tmp_path))
    whole = ids(torch.cat(list(iter_eval_batches(shards, 8, 3))))
    assert whole == list(range(10)) and ids(torch.cat(list(iter_eval_batches(shards, 8, 7)))) == whole
    parts = [ids(torch.cat(list(iter_eval_batches(shards, 8, 2, rank, 2, max_images=9)))) for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(9)) and not set(parts[0]) & set(parts[1])


def test_tar_helper_writes_what_webdataset_groups(tmp_path):
    write_id_shards(tmp_path, 1, 2)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
