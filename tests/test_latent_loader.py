"""The latent-shard training loader: decoding, sharding over ranks and workers, determinism, exact resume."""
import io
import json
import os
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.latents.loader import LatentDataConfig, LatentLoader
from pipeline.latents.reader import EpochOrder, draw_eps, scan_tar
from pipeline.shards import write_shard

C, H, W, L, D = 2, 4, 4, 6, 3
SCALE = 0.5


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def stored_latent(sample_id: int, storage: str, logvar: float) -> np.ndarray:
    """Mean (or VQ latent) whose values identify the sample: id + channel / 10 + small position term."""
    mean = (sample_id + np.arange(C)[:, None, None] / 10 + np.arange(H * W).reshape(1, H, W) / 100)
    mean = mean.astype(np.float16)
    if storage == "latents":
        return mean
    return np.concatenate([mean, np.full_like(mean, logvar)])


NULL_CONTEXT = np.full((L, D), -1.5, dtype=np.float16)
TEXT_ENCODER = {"kind": "openclip", "arch": "tiny", "pretrained": None, "layer": "last", "name_or_path": None,
                "sha256": "def", "width": D, "max_length": L, "null_context": "null_context.npy"}


def write_latents(folder: Path, counts: list[int], storage: str = "moments", logvar: float = 0.0,
                  tokens: bool = True) -> Path:
    """A latent folder in the formats.md layout: shards of KEY.latent.npy / txt / json (label: id % 3) and,
    with `tokens`, tokens.npy and a frozen text encoder's context.npy (+ null_context.npy)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, sample_id = [], 0
    for index, count in enumerate(counts):
        samples = []
        for _ in range(count):
            sample = {"__key__": f"{sample_id:08d}",
                      "latent.npy": npy_bytes(stored_latent(sample_id, storage, logvar)),
                      "txt": f"caption {sample_id}".encode(),
                      "json": json.dumps({"source_key": f"{sample_id:08d}", "label": sample_id % 3}).encode()}
            if tokens:
                sample["tokens.npy"] = npy_bytes(np.arange(L, dtype=np.int32) + sample_id)
                sample["context.npy"] = npy_bytes(np.full((L, D), sample_id, dtype=np.float16))
            samples.append(sample)
            sample_id += 1
        name = f"{index:05d}.tar"
        write_shard(folder / name, samples)
        shards.append({"name": name, "count": count, "sha256": "", "source": name})
    manifest = {"format": "ldm-pipeline/latents", "schema_version": 1,
                "encoder": {"kind": "kl" if storage == "moments" else "vq", "config": {}, "sha256": "abc",
                            "source": "test"},
                "resolution": 32, "crop": "center", "dtype": "float16", "storage": storage,
                "latent_shape": [C, H, W], "scale_factor": SCALE, "scale_factor_source": "config",
                "num_samples": sum(counts), "shards": shards, "skipped": {},
                "tokenizer": {"kind": "openclip", "name_or_path": None, "max_length": L} if tokens else None,
                "text_encoder": TEXT_ENCODER if tokens else None}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if tokens:
        np.save(folder / "null_context.npy", NULL_CONTEXT)
    return folder


@pytest.fixture(scope="module")
def moments_dir(tmp_path_factory) -> Path:
    return write_latents(tmp_path_factory.mktemp("moments"), [7, 11, 5, 9, 8])  # 40 samples, uneven shards


def config(path: Path, **overrides) -> LatentDataConfig:
    values = {"path": str(path), "batch_size": 4, "num_workers": 0, "seed": 0}
    return LatentDataConfig(**(values | overrides))


def take(loader: LatentLoader, num_batches: int) -> list[dict]:
    return list(islice(iter(loader), num_batches))


def ids(batches: list[dict]) -> list[int]:
    return [int(i) for b in batches for i in b["sample_id"]]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_vq_latents_shapes_dtypes_and_scale(tmp_path):
    folder = write_latents(tmp_path, [5, 6], storage="latents")
    loader = LatentLoader(config(folder, use_tokens=True, use_context=True))
    batch = next(iter(loader))
    assert batch["z"].shape == (4, C, H, W) and batch["z"].dtype == torch.float32
    assert batch["tokens"].shape == (4, L) and batch["tokens"].dtype == torch.int64
    assert batch["context"].shape == (4, L, D) and batch["context"].dtype == torch.float32
    for row, sample_id in enumerate(batch["sample_id"].tolist()):
        expected = torch.from_numpy(stored_latent(sample_id, "latents", 0.0).astype(np.float32)) * SCALE
        assert torch.equal(batch["z"][row], expected)  # VQ: z = latents * scale_factor, no noise
        assert batch["caption"][row] == f"caption {sample_id}" and batch["key"][row] == f"{sample_id:08d}"
        assert torch.equal(batch["tokens"][row], torch.arange(L) + sample_id)
        assert torch.all(batch["context"][row] == sample_id)
    null = loader.null_context()
    assert null.dtype == torch.float32 and torch.equal(null, torch.from_numpy(NULL_CONTEXT.astype(np.float32)))
    assert "label" not in batch


@pytest.mark.parametrize("source", ["label_key", "classes_file", "names"])
def test_labels_from_metadata_or_from_captions_through_classes_txt(tmp_path, source):
    """An index in the metadata, a caption's line in classes.txt, or (both set) the metadata's class name's line."""
    folder = write_latents(tmp_path / "latents", [5, 6], tokens=False)
    classes = {"label_key": None, "classes_file": [f"caption {i}" for i in reversed(range(11))],  # 10 - sample id
               "names": ["2", "1", "0"]}[source]  # the metadata's label i % 3 read as a name: class 2 - i % 3
    (tmp_path / "classes.txt").write_text("\n".join(classes or []) + "\n")
    setting = {"label_key": "label"} if source != "classes_file" else {}
    setting |= {"classes_file": str(tmp_path / "classes.txt")} if classes else {}
    loader = LatentLoader(config(folder, num_workers=2, **setting))
    rule = {"label_key": lambda i: i % 3, "classes_file": lambda i: 10 - i, "names": lambda i: 2 - i % 3}[source]
    for batch in take(loader, 3):
        assert batch["label"].dtype == torch.int64
        assert batch["label"].tolist() == [rule(i) for i in batch["sample_id"].tolist()]
    assert loader.classes == classes


def test_label_and_context_errors_name_what_to_change(tmp_path):
    folder = write_latents(tmp_path / "latents", [4], tokens=False)
    (tmp_path / "names.txt").write_text("0\n1\n")
    with pytest.raises(ValueError, match="has metadata 'label' '2', which is no line of data.classes_file"):
        take(LatentLoader(config(folder, label_key="label", classes_file=str(tmp_path / "names.txt"), shuffle=False)), 2)
    with pytest.raises(ValueError, match="None under data.label_key='class'"):
        take(LatentLoader(config(folder, label_key="class")), 1)
    (tmp_path / "classes.txt").write_text("caption 0\ncaption 1\n")
    with pytest.raises(ValueError, match="caption 2.*no line of data.classes_file"):
        take(LatentLoader(config(folder, classes_file=str(tmp_path / "classes.txt"), shuffle=False)), 1)
    (tmp_path / "bad.txt").write_text("cat\n\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"blank lines \[1\] / repeated names \['cat'\]"):
        LatentLoader(config(folder, classes_file=str(tmp_path / "bad.txt")))
    with pytest.raises(ValueError, match="data.classes_file=.*does not exist"):
        LatentLoader(config(folder, classes_file=str(tmp_path / "none.txt")))
    with pytest.raises(ValueError, match="rerun jobs.precompute with text_encoder.kind=openclip"):
        LatentLoader(config(folder, use_context=True))
    with pytest.raises(ValueError, match="rerun jobs.precompute with text_encoder.kind=openclip"):
        LatentLoader(config(folder)).check_compatible(latent_channels=C, latent_size=H, context_dim=D)


def test_moments_reparameterisation_is_deterministic_per_sample_and_epoch(moments_dir):
    """z = (mean + std * eps) * scale with eps a function of (seed, epoch, sample id) only."""
    loader = LatentLoader(config(moments_dir, batch_size=10))
    batches = take(loader, 8)  # 4 batches per epoch: epochs 0 and 1
    eps_by_epoch: dict[tuple[int, int], torch.Tensor] = {}
    for k, batch in enumerate(batches):
        for row, sample_id in enumerate(batch["sample_id"].tolist()):
            mean = torch.from_numpy(stored_latent(sample_id, "moments", 0.0)[:C].astype(np.float32))
            eps = batch["z"][row] / SCALE - mean  # logvar 0: std 1
            expected = draw_eps(0, k // 4, np.array([sample_id]), (C, H, W))[0]
            torch.testing.assert_close(eps, expected, atol=1e-4, rtol=0)
            eps_by_epoch[(k // 4, sample_id)] = eps
    all_eps = torch.stack(list(eps_by_epoch.values()))
    assert abs(all_eps.mean().item()) < 0.1 and abs(all_eps.std().item() - 1) < 0.1
    assert not torch.allclose(eps_by_epoch[(0, 3)], eps_by_epoch[(1, 3)])  # a fresh draw every epoch
    # Another batch size, rank split and worker count draws the same noise for the same (epoch, sample).
    other = next(iter(LatentLoader(config(moments_dir, num_workers=2), rank=1, world_size=2)))
    epoch0 = batches[:4]
    z_by_id = dict(zip(ids(epoch0), torch.cat([b["z"] for b in epoch0])))
    for row, sample_id in enumerate(other["sample_id"].tolist()):
        assert torch.equal(other["z"][row], z_by_id[sample_id])


def test_small_variance_gives_the_scaled_mean(tmp_path):
    folder = write_latents(tmp_path, [6], logvar=-40.0, tokens=False)  # clamped to -30: std ~ 3e-7
    batch = next(iter(LatentLoader(config(folder, batch_size=6))))
    for row, sample_id in enumerate(batch["sample_id"].tolist()):
        mean = torch.from_numpy(stored_latent(sample_id, "moments", 0.0)[:C].astype(np.float32))
        torch.testing.assert_close(batch["z"][row], mean * SCALE, atol=1e-5, rtol=0)


@pytest.mark.parametrize("counts", [[7, 11, 5, 9, 8], [40], [13, 27]], ids=["5-shards", "1-shard", "2-shards"])
def test_ranks_and_workers_see_disjoint_samples_covering_each_epoch(tmp_path, counts):
    """2 ranks x 2 workers, with as few as 1 shard: every sample exactly once per epoch, no hang."""
    folder = write_latents(tmp_path, counts, tokens=False)
    per_rank = [take(LatentLoader(config(folder, num_workers=2), rank=r, world_size=2), 10) for r in range(2)]
    for epoch in range(2):  # 5 batches of 4 per rank and epoch
        seen = [ids(batches[epoch * 5:(epoch + 1) * 5]) for batches in per_rank]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(40))
    assert ids(per_rank[0][:5]) != ids(per_rank[0][5:])  # reshuffled for epoch 1


def test_drop_last_false_pads_ranks_and_ends_with_a_short_batch(tmp_path):
    folder = write_latents(tmp_path, [3, 4], tokens=False)  # 7 samples, 2 ranks: 4 each, one padded
    per_rank = [take(LatentLoader(config(folder, batch_size=3, drop_last=False), rank=r, world_size=2), 2)
                for r in range(2)]
    assert [len(b["sample_id"]) for b in per_rank[0]] == [3, 1]
    assert set(ids(per_rank[0]) + ids(per_rank[1])) == set(range(7))


def test_order_is_deterministic_for_a_seed_and_changes_with_seed_and_epoch(moments_dir):
    first = ids(take(LatentLoader(config(moments_dir)), 20))
    assert first == ids(take(LatentLoader(config(moments_dir, num_workers=2)), 20))
    assert first != ids(take(LatentLoader(config(moments_dir, seed=1)), 20))
    assert sorted(first[:40]) == sorted(first[40:]) == list(range(40)) and first[:40] != first[40:]
    unshuffled = ids(take(LatentLoader(config(moments_dir, shuffle=False)), 10))
    assert unshuffled == list(range(40))


def test_shuffle_windows_cover_the_epoch_and_stay_within_windows():
    counts = [7, 11, 5, 9, 8]
    order = EpochOrder(counts, seed=3, epoch=2, shuffle=True, window_shards=2)
    sample_ids = order.ids(np.arange(40))
    assert sorted(sample_ids.tolist()) == list(range(40))
    shards, offsets = order.locate(sample_ids)
    first_window = set(order.windows[0].tolist())
    size = sum(counts[s] for s in first_window)
    assert set(shards[:size].tolist()) == first_window  # reads stay in the window's shards
    assert all(0 <= o < counts[s] for s, o in zip(shards, offsets))


def test_with_shuffle_windows_each_rank_reads_only_its_windows(tmp_path):
    folder = write_latents(tmp_path, [5] * 8, tokens=False)
    shards_read = []
    for rank in range(4):  # 10 samples per rank and epoch = 2 windows of 1 shard
        loader = LatentLoader(config(folder, batch_size=5, shuffle_window_shards=1), rank=rank, world_size=4)
        shards_read.append({i // 5 for i in ids(take(loader, 2))})
    assert all(len(shards) == 2 for shards in shards_read)
    assert set().union(*shards_read) == set(range(8))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 5, 7])  # mid-epoch, at the epoch boundary, across it (5 batches per epoch)
def test_resume_reproduces_the_uninterrupted_batches_bitwise(moments_dir, num_workers, cut):
    cfg = config(moments_dir, num_workers=num_workers, use_tokens=True, shuffle_window_shards=2)
    uninterrupted = take(LatentLoader(cfg, rank=1, world_size=2), 2 * cut)
    first = LatentLoader(cfg, rank=1, world_size=2)
    before = take(first, cut)  # workers have prefetched beyond the cut; the state counts consumed batches
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert state["epoch"] == cut // 5 and state["batch_in_epoch"] == cut % 5 and state["samples_consumed"] == 4 * cut
    resumed = LatentLoader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert_same_batches(uninterrupted, before + take(resumed, cut))


def test_resume_with_another_worker_count_and_repeated_iter(moments_dir):
    uninterrupted = take(LatentLoader(config(moments_dir, num_workers=2)), 8)
    loader = LatentLoader(config(moments_dir, num_workers=0))
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    more = take(loader, 2)  # a new iter() continues from the consumed position
    with pytest.raises(RuntimeError, match="superseded"):
        next(it)
    resumed = LatentLoader(config(moments_dir, num_workers=2))
    resumed.load_state_dict(state)
    assert_same_batches(uninterrupted, head + more + take(resumed, 5)[2:])


def test_config_and_resume_errors(moments_dir, tmp_path):
    with pytest.raises(ValueError, match="data.batch_size"):
        LatentDataConfig(path="x", batch_size=0)
    with pytest.raises(ValueError, match="data.path"):
        LatentDataConfig()
    with pytest.raises(ValueError, match="data.shuffle_window_shards"):
        LatentDataConfig(path="x", shuffle_window_shards=-1)
    with pytest.raises(ValueError, match="has no manifest.json"):
        LatentLoader(config(tmp_path))
    with pytest.raises(ValueError, match="lower data.batch_size"):
        LatentLoader(config(moments_dir, batch_size=16), rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        LatentLoader(config(moments_dir), rank=2, world_size=2)
    state = LatentLoader(config(moments_dir)).state_dict()
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        LatentLoader(config(moments_dir, seed=1)).load_state_dict(state)


def test_check_compatible_names_the_mismatch(moments_dir):
    loader = LatentLoader(config(moments_dir))
    loader.check_compatible(latent_channels=C, latent_size=H, encoder_sha256="abc")
    with pytest.raises(ValueError, match="latent channels"):
        loader.check_compatible(latent_channels=C + 1, latent_size=H)
    with pytest.raises(ValueError, match="encoder"):
        loader.check_compatible(latent_channels=C, latent_size=H, encoder_sha256="other")
    loader.check_compatible(latent_channels=C, latent_size=H, context_dim=D)
    with pytest.raises(ValueError, match=f"context width: the stored context is {D} wide .* context_dim is 64; "
                                         f"choose a model.preset with unet.context_dim={D}"):
        loader.check_compatible(latent_channels=C, latent_size=H, context_dim=64)


def test_missing_tokens_and_truncated_shard_are_named(tmp_path):
    folder = write_latents(tmp_path / "plain", [4], tokens=False)
    with pytest.raises(ValueError, match="data.use_tokens=false"):
        LatentLoader(config(folder, use_tokens=True))
    broken = write_latents(tmp_path / "broken", [4, 4], tokens=False)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["shards"][1]["count"], manifest["num_samples"] = 5, 9
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="00001.tar holds 4 samples, the manifest says 5"):
        take(LatentLoader(config(broken, batch_size=9, shuffle=False)), 1)


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_scan_matches_tarfile_incl_long_names(tmp_path, tar_format):
    long_name = "d" * 120 + "/x.txt" if tar_format == tarfile.USTAR_FORMAT else "d/" + "x" * 120 + ".latent.npy"
    members = [("a.txt", b"hello"), (long_name, b"y" * 1000), ("b.txt", b"z" * 513)]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        scanned = list(scan_tar(fd, path))
    finally:
        os.close(fd)
    with tarfile.open(path) as tar:
        assert scanned == [(m.name, m.offset_data, m.size) for m in tar]
    path.write_bytes(path.read_bytes()[:1500])
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(ValueError, match="truncated|checksum"):
        list(scan_tar(fd, path))
    os.close(fd)
