"""Precompute on a real local Ray cluster: image shards (demo scenes + bad samples) -> latent shards."""
import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from jobs.config import register_schemas, to_dataclass
from jobs.demo.scenes import write_demo_dataset
from ldm.autoencoder.config import AUTOENCODER_PRESETS
from ldm.autoencoder.model import DiagonalGaussian, build_autoencoder
from ldm.diffusion.tokenizers import OpenCLIPTokenizer
from pipeline.latents.loader import LatentDataConfig, LatentLoader
from pipeline.latents.manifest import (
    check_compatible,
    iter_latent_samples,
    read_manifest,
)
from pipeline.models.autoencoder import load_autoencoder, save_autoencoder
from pipeline.models.text_encoder import TextEncoderConfig, load_text_encoder
from pipeline.precompute.shard import (
    ImagePolicy,
    encode_batch,
    encode_text_batch,
    local_encoder,
    local_text_encoder,
    prepare_image,
    process_shard,
    tar_is_complete,
)
from pipeline.precompute.stage import PrecomputeConfig, TokenizerConfig, precompute
from pipeline.shards import iter_samples, write_shard

pytestmark = pytest.mark.slow
RES = 32                   # debug presets: f = 4, latents 8 x 8
NUM_KILL_SHARDS = 8
TEXT_WIDTH = 32            # the tiny OpenCLIP text tower: 2 blocks of width 32
CONF = Path(__file__).resolve().parents[1] / "conf"
register_schemas()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _sample(key: str, image: bytes, caption: str | None) -> dict:
    sample = {"__key__": key, "jpg": image, "json": json.dumps({"key": key, "caption": caption or ""}).encode()}
    if caption is not None:
        sample["txt"] = caption.encode()
    return sample


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(image bytes, caption) of 25 demo scenes, 48 px, and one 64 x 48 picture."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, 25, seed=1, image_size=48)
    rows = pq.read_table(root / "urls.parquet").to_pylist()
    pictures = [((root / r["url"]).read_bytes(), r["caption"]) for r in rows]
    wide = Image.open(io.BytesIO(pictures[0][0])).resize((64, 48))
    return pictures + [(_jpeg(wide), "a wide picture")]


@pytest.fixture(scope="module")
def image_shards(demo, tmp_path_factory):
    """Five shards of 5 good samples each, plus: a corrupt and a truncated JPEG (shard 0), a sample without
    caption and a 16 px image (shard 1), a wide picture (shard 2). Shard 3 is cut inside a member, shard 4
    at a member boundary, between the image and the caption of its fourth sample."""
    folder = tmp_path_factory.mktemp("images")
    shards = [[_sample(f"{s:05d}{i:04d}", *demo[s * 5 + i]) for i in range(5)] for s in range(5)]
    good = demo[0][0]
    shards[0] += [_sample("000000100", os.urandom(900), "noise"), _sample("000000101", good[:len(good) // 2], "cut")]
    shards[1] += [_sample("000010100", good, None), _sample("000010101", _jpeg(Image.new("RGB", (16, 16))), "tiny")]
    shards[2] += [_sample("000020100", demo[-1][0], demo[-1][1])]
    for s, samples in enumerate(shards):
        write_shard(folder / f"{s:05d}.tar", samples)
    data = (folder / "00003.tar").read_bytes()
    (folder / "00003.tar").write_bytes(data[: int(len(data) * 0.6) + 100])
    with tarfile.open(folder / "00004.tar") as tar:
        cut = tar.getmember("000040003.txt").offset
    (folder / "00004.tar").write_bytes((folder / "00004.tar").read_bytes()[:cut])
    return folder


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ae")
    for kind in ("kl", "vq"):
        torch.manual_seed(1)
        cfg = AUTOENCODER_PRESETS[f"debug-{kind}"]
        save_autoencoder(build_autoencoder(cfg), cfg, folder / kind, source="test")
    return {"kl": folder / "kl", "vq": folder / "vq"}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> str:
    """A random tiny OpenCLIP saved as an open_clip `local-dir:` folder (config + weights): every Ray
    worker can build it by name, offline."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_open_clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2, "layers": 2}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(3)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def _config(inputs, out, autoencoder, **overrides) -> PrecomputeConfig:
    settings = {"resolution": RES, "batch_size": 4, "num_scale_samples": 16} | overrides
    return PrecomputeConfig(input_dir=str(inputs), output_dir=str(out), autoencoder=str(autoencoder), **settings)


@pytest.fixture(scope="module")
def kl_run(ray_cluster, image_shards, autoencoders, tmp_path_factory):
    cfg = _config(image_shards, tmp_path_factory.mktemp("kl") / "out", autoencoders["kl"])
    return cfg, precompute(cfg)


def _source_images(image_shards: Path) -> dict[tuple[str, str], bytes]:
    return {(path.name, s["__key__"]): s["jpg"] for path in sorted(image_shards.glob("*.tar"))
            for s in iter_samples(path)}


def test_latents_equal_encoding_the_same_images_directly(kl_run, image_shards, autoencoders):
    cfg, _ = kl_run
    model, _, _ = load_autoencoder(autoencoders["kl"])
    sources = _source_images(image_shards)
    samples = list(iter_latent_samples(cfg.output_dir))
    for sample in samples:
        meta = sample["meta"]
        image, reason, box = prepare_image(sources[meta["source_shard"], meta["source_key"]], ImagePolicy(RES),
                                           f"{meta['source_shard']}/{meta['source_key']}")
        direct = encode_batch(model, image[None], out_dtype="float32")[0]
        assert sample["latent"].dtype == np.float16 and sample["latent"].shape == (8, 8, 8)  # [2C, h, w]
        np.testing.assert_allclose(sample["latent"].astype(np.float32), direct, rtol=2e-3, atol=2e-3)
        assert meta["crop_box"] == box and sample["key"] == meta["source_key"] == meta["key"]
        assert sample["caption"] == meta["caption"]
    wide = next(s for s in samples if s["caption"] == "a wide picture")
    assert wide["meta"]["crop_box"] == [8, 0, 48]  # the centre square of 64 x 48


def test_manifest_counts_add_up(kl_run, image_shards, autoencoders):
    cfg, summary = kl_run
    manifest = read_manifest(cfg.output_dir)
    survivors = len(list(iter_samples(image_shards / "00003.tar")))  # the samples before the cut
    assert 0 < survivors < 5
    assert manifest["skipped"] == {"corrupt_image": 2, "missing_caption": 1, "too_small": 1, "truncated_tar": 2,
                                   "bad_boxes": 0}
    assert manifest["num_samples"] == 5 * 3 + 1 + survivors + 3 == sum(s["count"] for s in manifest["shards"])
    assert manifest["num_samples"] == len(list(iter_latent_samples(cfg.output_dir)))
    for shard in manifest["shards"]:
        data = (Path(cfg.output_dir) / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["source"] == shard["name"]
    _, _, identity = load_autoencoder(autoencoders["kl"])
    assert manifest["encoder"] == {k: identity[k] for k in ("kind", "config", "sha256", "source")}
    assert (manifest["storage"], manifest["dtype"], manifest["latent_shape"]) == ("moments", "float16", [4, 8, 8])
    assert summary["samples"] == manifest["num_samples"] and summary["skipped"] == manifest["skipped"]
    sizes = [(Path(cfg.output_dir) / s["name"]).stat().st_size for s in manifest["shards"]]
    assert summary["bytes_written"] == sum(sizes)
    assert not list(Path(cfg.output_dir).glob("*tmp*"))


def test_scale_factor_is_one_over_the_latent_std(kl_run):
    """App. G: 1 / std of z ~ q(z|x); checked against std^2 = E[mean^2 + var] - E[mean]^2 over the same samples."""
    cfg, _ = kl_run
    manifest = read_manifest(cfg.output_dir)
    moments = torch.stack([torch.from_numpy(s["latent"].astype(np.float32))
                           for s in iter_latent_samples(cfg.output_dir)][: cfg.num_scale_samples])
    q = DiagonalGaussian(moments)
    variance = (q.mean.square() + q.var).mean() - q.mean.mean().square()
    assert manifest["scale_factor_source"] == "estimated"
    assert manifest["scale_factor"] == pytest.approx(variance.rsqrt().item(), rel=0.03)


def test_rerun_skips_finished_shards_and_redoes_a_lost_one(kl_run, tmp_path):
    cfg, _ = kl_run
    out = tmp_path / "out"
    shutil.copytree(cfg.output_dir, out)
    before = read_manifest(out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[0234].tar")}
    (out / "00001.tar").unlink()  # as if killed after shard 1's tar was renamed, before its marker
    (out / "_work" / "00001.json").unlink()
    (out / "00002.tar.tmp-12345").write_bytes(b"half a tar")  # a writer killed mid-write
    summary = precompute(_config(cfg.input_dir, out, cfg.autoencoder))
    assert (summary["shards_encoded"], summary["shards_already_done"]) == (1, 4)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000[0234].tar")} == kept
    assert read_manifest(out) == before  # shard 1 came back byte-identical
    again = precompute(_config(cfg.input_dir, out, cfg.autoencoder))
    assert (again["shards_encoded"], again["samples"], again["num_samples_total"]) == (0, 0, before["num_samples"])


def _named_encoder(ray, run: threading.Thread):
    deadline = time.time() + 120
    while time.time() < deadline and run.is_alive():
        names = sorted(n for n in ray.util.list_named_actors() if n.startswith("precompute-"))
        if names:
            return ray.get_actor(names[-1])
        time.sleep(0.01)
    raise AssertionError("no encoder actor appeared")


def _in_thread(function) -> tuple[threading.Thread, dict]:
    result = {}

    def target():
        try:
            result["value"] = function()
        except Exception as err:  # noqa: BLE001 (handed to the test thread, which re-raises it)
            result["error"] = err
    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def _three_per_shard(demo, folder: Path, num_shards: int) -> list[str]:
    """`num_shards` image shards of 3 good samples each; returns their keys."""
    folder.mkdir()
    keys = []
    for s in range(num_shards):
        keys += [f"{s:05d}{i:04d}" for i in range(3)]
        write_shard(folder / f"{s:05d}.tar", [_sample(k, *demo[i]) for i, k in enumerate(keys[-3:])])
    return keys


def test_a_killed_encoder_worker_still_gives_every_sample_exactly_once(ray_cluster, demo, autoencoders, tmp_path):
    inputs, out = tmp_path / "images", tmp_path / "out"
    keys = _three_per_shard(demo, inputs, NUM_KILL_SHARDS)
    run, result = _in_thread(lambda: precompute(_config(inputs, out, autoencoders["kl"], batch_size=1)))
    encoder = _named_encoder(ray_cluster, run)
    pid = ray_cluster.get(encoder.pid.remote())
    while not list((out / "_work").glob("0*.json")) and run.is_alive():
        time.sleep(0.005)
    finished_at_kill = len(list((out / "_work").glob("0*.json")))
    os.kill(pid, signal.SIGKILL)  # the encoder's worker process dies mid-run
    run.join(timeout=180)
    if "error" in result:
        raise result["error"]
    assert 0 < finished_at_kill < NUM_KILL_SHARDS, "the kill should land while shards are still in flight"
    assert result["value"]["samples"] == len(keys)
    got = [s["key"] for s in iter_latent_samples(out)]
    assert sorted(got) == sorted(keys) and len(set(got)) == len(got)


def test_a_killed_decode_task_worker_is_retried_and_every_sample_appears_exactly_once(ray_cluster, demo, autoencoders,
                                                                                     tmp_path):
    """The worker process of one shard (decode) task exits mid-shard, after its second batch came back
    from the encoder and before its shard is written (`fail_once_marker`: os._exit, once); Ray runs the
    task again (max_retries) and the output holds every input sample exactly once."""
    inputs, out, marker = tmp_path / "images", tmp_path / "out", tmp_path / "died"
    keys = _three_per_shard(demo, inputs, 4)
    summary = precompute(_config(inputs, out, autoencoders["kl"], batch_size=1, fail_once_marker=str(marker)))
    assert marker.is_file(), "no shard task died: the test did not test anything"
    assert summary["samples"] == read_manifest(out)["num_samples"] == len(keys)
    got = [s["key"] for s in iter_latent_samples(out)]
    assert sorted(got) == sorted(keys) and len(set(got)) == len(got)
    assert not list(out.glob("*tmp*"))


def _compose(overrides: list[str]) -> PrecomputeConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_dataclass(compose("precompute", overrides=overrides), PrecomputeConfig)


def test_vq_run_from_the_hydra_job_with_tokens_text_context_and_random_crops(ray_cluster, image_shards, autoencoders,
                                                                              tiny_open_clip, tmp_path):
    (tmp_path / "images").mkdir()  # one shard: each Ray worker that tokenizes imports open_clip (seconds)
    shutil.copy(image_shards / "00002.tar", tmp_path / "images")
    overrides = [f"input_dir={tmp_path / 'images'}", f"output_dir={tmp_path / 'out'}", f"autoencoder={autoencoders['vq']}",
                 f"resolution={RES}", "crop=random", "seed=5", "batch_size=4", "tokenizer.kind=openclip",
                 "tokenizer.max_length=16", "text_encoder.kind=openclip", f"text_encoder.arch={tiny_open_clip}"]
    summary = precompute(_compose(overrides))
    manifest = read_manifest(tmp_path / "out")
    assert (manifest["storage"], manifest["latent_shape"], manifest["crop"]) == ("latents", [4, 8, 8], "random")
    assert (manifest["scale_factor"], manifest["scale_factor_source"]) == (1.0, "config")  # VQ: unscaled
    assert manifest["tokenizer"] == {"kind": "openclip", "name_or_path": None, "max_length": 16}
    assert summary["num_samples_total"] == manifest["num_samples"] == 6
    samples = list(iter_latent_samples(tmp_path / "out"))
    tokens = OpenCLIPTokenizer(16)([s["caption"] for s in samples]).numpy()
    np.testing.assert_array_equal(np.stack([s["tokens"] for s in samples]), tokens)
    assert samples[0]["tokens"].dtype == np.int32 and samples[0]["latent"].shape == (4, 8, 8)
    model, _, _ = load_autoencoder(autoencoders["vq"])
    sources = _source_images(image_shards)
    wide = next(s for s in samples if s["caption"] == "a wide picture")
    image, _, box = prepare_image(sources["00002.tar", wide["key"]], ImagePolicy(RES, "random", 5),
                                  f"00002.tar/{wide['key']}")
    assert wide["meta"]["crop_box"] == box
    direct = encode_batch(model, image[None], out_dtype="float32")[0]
    np.testing.assert_allclose(wide["latent"].astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    _check_stored_context(tmp_path / "out", samples, manifest, tiny_open_clip)
    null_before = (tmp_path / "out" / "null_context.npy").read_bytes()
    with pytest.raises(ValueError, match=r"other \['text_encoder'\].*choose another output_dir"):
        precompute(_compose(overrides + ["text_encoder.layer=penultimate"]))
    assert (tmp_path / "out" / "null_context.npy").read_bytes() == null_before  # a refused rerun changes nothing


def _check_stored_context(out: Path, samples: list[dict], manifest: dict, arch: str) -> None:
    """KEY.context.npy = the text encoder run on the caption directly (float16 precision); the manifest
    names the encoder and its tokenizer; null_context.npy is the context of ""; the loader reads them."""
    encoder, identity = load_text_encoder(TextEncoderConfig(kind="openclip", arch=arch))
    assert manifest["text_encoder"] == identity | {"max_length": 16, "null_context": "null_context.npy"}
    assert (identity["width"], identity["layer"]) == (TEXT_WIDTH, "last") and len(identity["sha256"]) == 64
    tokenize = OpenCLIPTokenizer(16)
    with torch.no_grad():
        direct = encoder(tokenize([s["caption"] for s in samples])).numpy()
        null = encoder(tokenize([""]))[0].numpy()
    stored = np.stack([s["context"] for s in samples])
    assert stored.dtype == np.float16 and stored.shape == (len(samples), 16, TEXT_WIDTH)
    np.testing.assert_allclose(stored.astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    assert not np.allclose(stored[0], stored[1], atol=1e-2)  # the captions differ, so do their contexts
    np.testing.assert_allclose(np.load(out / "null_context.npy").astype(np.float32), null, rtol=2e-3, atol=2e-3)
    loader = LatentLoader(LatentDataConfig(path=str(out), batch_size=3, num_workers=0, use_context=True))
    loader.check_compatible(latent_channels=4, latent_size=8, context_dim=TEXT_WIDTH)
    batch = next(iter(loader))
    assert batch["context"].shape == (3, 16, TEXT_WIDTH) and loader.null_context().shape == (16, TEXT_WIDTH)


def test_other_settings_in_the_same_output_dir_fail_before_any_work(kl_run):
    cfg, _ = kl_run
    with pytest.raises(ValueError, match=r"other \['resolution'\].*choose another output_dir"):
        precompute(_config(cfg.input_dir, cfg.output_dir, cfg.autoencoder, resolution=16))
    with pytest.raises(ValueError, match="resolution=30: set it to a multiple of the autoencoder's downsampling"):
        precompute(_config(cfg.input_dir, cfg.output_dir, cfg.autoencoder, resolution=30))
    with pytest.raises(ValueError, match="no autoencoder at '/no/such/ae'.*does not exist"):
        precompute(_config(cfg.input_dir, cfg.output_dir, "/no/such/ae"))


def test_check_compatible_names_what_differs_and_what_to_change(kl_run):
    cfg, _ = kl_run
    manifest = read_manifest(cfg.output_dir)
    sha = manifest["encoder"]["sha256"]
    check_compatible(manifest, latent_channels=4, latent_size=8, encoder_sha256=sha)
    check_compatible(manifest, latent_channels=4, latent_size=(8, 8), encoder_sha256=None)
    with pytest.raises(ValueError, match=r"latent channels: the latents have 4 .* expects 3; set the model's latent "
                                         r"channels to 4"):
        check_compatible(manifest, latent_channels=3, latent_size=8, encoder_sha256=sha)
    with pytest.raises(ValueError, match=r"latent size: the latents are 8x8 .* expects 16x16"):
        check_compatible(manifest, latent_channels=4, latent_size=16, encoder_sha256=sha)
    with pytest.raises(ValueError, match=r"encoder: the latents were made by encoder ours:.*use that autoencoder"):
        check_compatible(manifest, latent_channels=4, latent_size=8, encoder_sha256="0" * 64)


def test_prepare_image_is_the_square_crop_resized_with_pil(demo):
    wide = demo[-1][0]
    image, reason, box = prepare_image(wide, ImagePolicy(RES), "s/k")
    plain = Image.open(io.BytesIO(wide)).convert("RGB").crop((8, 0, 56, 48)).resize((RES, RES), Image.BICUBIC)
    assert reason is None and box == [8, 0, 48]
    np.testing.assert_array_equal(image, np.asarray(plain).transpose(2, 0, 1))
    boxes = {tuple(prepare_image(wide, ImagePolicy(RES, "random", seed), "s/k")[2]) for seed in range(20)}
    assert len(boxes) > 3 and all(0 <= left <= 16 and top == 0 for left, top, _ in boxes)
    assert prepare_image(wide, ImagePolicy(RES, "random", 3), "s/k")[2] == prepare_image(
        wide, ImagePolicy(RES, "random", 3), "s/k")[2]  # a retried shard makes the same crop
    assert prepare_image(wide, ImagePolicy(64), "s/k")[1] == "too_small"
    assert prepare_image(b"not a picture", ImagePolicy(RES), "s/k")[1] == "corrupt_image"


def test_crop_fractions_and_the_area_filter_make_the_sr_sets_hr_crops(demo):
    """Side = shorter side x U(min, max) per key (the same on a retry), resized by area averaging."""
    buffer = io.BytesIO()  # a PNG: JPEG draft decoding at 1/2 scale would change the pixels compared
    Image.open(io.BytesIO(demo[-1][0])).save(buffer, "PNG")
    wide = buffer.getvalue()  # 64 x 48
    policy = ImagePolicy(16, "random", 0, 0.5, 1.0, "area")
    boxes = [prepare_image(wide, ImagePolicy(16, "random", seed, 0.5, 1.0), "s/k")[2] for seed in range(30)]
    assert all(24 <= side <= 48 and left + side <= 64 and top + side <= 48 for left, top, side in boxes)
    assert len({side for _, _, side in boxes}) > 5
    image, _, (left, top, side) = prepare_image(wide, policy, "s/k")
    plain = Image.open(io.BytesIO(wide)).convert("RGB").crop((left, top, left + side, top + side))
    np.testing.assert_array_equal(image, np.asarray(plain.resize((16, 16), Image.BOX)).transpose(2, 0, 1))
    assert prepare_image(wide, policy, "s/k")[2] == [left, top, side]
    with pytest.raises(ValueError, match="min_crop_fraction"):
        ImagePolicy(16, min_crop_fraction=0.8, max_crop_fraction=0.5)
    with pytest.raises(ValueError, match="resize_filter"):
        ImagePolicy(16, resize_filter="lanczos")


def test_keep_images_stores_exactly_the_pixels_the_encoder_saw(image_shards, autoencoders, tmp_path):
    model, _, _ = load_autoencoder(autoencoders["kl"])
    seen = []

    def encode(chunks):
        for chunk in local_encoder(model)(iter(seen.append(c) or c for c in chunks)):
            yield chunk
    process_shard(image_shards / "00002.tar", tmp_path, ImagePolicy(RES, keep_image=True), 4, encode)
    stored = [np.asarray(Image.open(io.BytesIO(s["image.png"]))) for s in iter_samples(tmp_path / "00002.tar")]
    np.testing.assert_array_equal(np.stack(stored), np.concatenate(seen).transpose(0, 2, 3, 1))
    process_shard(image_shards / "00002.tar", tmp_path / "plain", ImagePolicy(RES), 4, local_encoder(model))
    assert not any("image.png" in s for s in iter_samples(tmp_path / "plain" / "00002.tar"))


def test_process_shard_without_ray(image_shards, autoencoders, tmp_path):
    """The pure core: counts, the finished marker, and an all-skipped shard that leaves no tar."""
    model, _, _ = load_autoencoder(autoencoders["kl"])
    encode = local_encoder(model)
    stats = process_shard(image_shards / "00001.tar", tmp_path, ImagePolicy(RES), 3, encode)
    assert (stats["count"], stats["skipped"]["missing_caption"], stats["skipped"]["too_small"]) == (5, 1, 1)
    assert json.loads((tmp_path / "_work" / "00001.json").read_text())["sha256"] == stats["sha256"]
    assert len(list(iter_samples(tmp_path / "00001.tar"))) == 5
    assert not any("context.npy" in s for s in iter_samples(tmp_path / "00001.tar"))
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "00009.tar", [_sample("k", b"junk", "a caption")])
    empty = process_shard(tmp_path / "in" / "00009.tar", tmp_path, ImagePolicy(RES), 3, encode)
    assert (empty["count"], empty["skipped"]["corrupt_image"], empty["sha256"]) == (0, 1, None)
    assert not (tmp_path / "00009.tar").exists() and (tmp_path / "_work" / "00009.json").exists()
    assert tar_is_complete(image_shards / "00000.tar")
    assert not tar_is_complete(image_shards / "00003.tar") and not tar_is_complete(image_shards / "00004.tar")


def test_process_shard_stores_a_local_text_encoders_context(image_shards, autoencoders, tiny_open_clip, tmp_path):
    """The pure core with a text encoder: tokens and contexts of the kept samples' captions, in order."""
    encoder, _ = load_text_encoder(TextEncoderConfig(kind="openclip", arch=tiny_open_clip, layer="penultimate"))
    tokenize = OpenCLIPTokenizer(8)
    encode, encode_text = local_encoder(load_autoencoder(autoencoders["kl"])[0]), local_text_encoder(encoder)
    assert process_shard(image_shards / "00002.tar", tmp_path, ImagePolicy(RES), 4, encode, tokenize,
                         encode_text)["count"] == 6
    samples = list(iter_samples(tmp_path / "00002.tar"))
    tokens = tokenize([s["txt"].decode() for s in samples])
    with torch.no_grad():
        direct = encoder(tokens).numpy()
    stored = np.stack([np.load(io.BytesIO(s["context.npy"])) for s in samples])
    assert stored.shape == (6, 8, TEXT_WIDTH) and len(encoder.blocks) == 1  # penultimate: 1 of 2 blocks
    np.testing.assert_allclose(stored.astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(np.stack([np.load(io.BytesIO(s["tokens.npy"])) for s in samples]), tokens)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="crop must be one of"):
        PrecomputeConfig(input_dir="a", output_dir="b", autoencoder="c", crop="stretch")
    with pytest.raises(ValueError, match="autoencoder"):
        PrecomputeConfig(input_dir="a", output_dir="b")
    with pytest.raises(ValueError, match="tokenizer.kind"):
        PrecomputeConfig(input_dir="a", output_dir="b", autoencoder="c", tokenizer=TokenizerConfig(kind="gpt"))
    with pytest.raises(ValueError, match="text_encoder.kind=openclip needs text_encoder.arch"):
        TextEncoderConfig(kind="openclip")
    with pytest.raises(ValueError, match="with kind=hf_clip set name_or_path only"):
        TextEncoderConfig(kind="hf_clip", name_or_path="openai/clip-vit-large-patch14", arch="ViT-L-14")
    clip = TextEncoderConfig(kind="hf_clip", name_or_path="openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match=r"tokenizer.kind=bert .* is not the tokenizer of text_encoder.kind=hf_clip "
                                         r"\(kind=hf_clip, name_or_path=openai/clip-vit-large-patch14\)"):
        PrecomputeConfig(input_dir="a", output_dir="b", autoencoder="c", text_encoder=clip,
                         tokenizer=TokenizerConfig(kind="bert", name_or_path="bert-base-uncased"))
    implied = PrecomputeConfig(input_dir="a", output_dir="b", autoencoder="c", text_encoder=clip,
                               tokenizer=TokenizerConfig(max_length=32))
    assert implied.resolved_tokenizer() == {"kind": "hf_clip", "name_or_path": "openai/clip-vit-large-patch14",
                                            "max_length": 32}


@pytest.mark.gpu
def test_bf16_encoding_on_cuda_is_close_to_fp32(demo, autoencoders):
    model, _, _ = load_autoencoder(autoencoders["kl"])
    images = np.stack([prepare_image(jpg, ImagePolicy(RES), "s/k")[0] for jpg, _ in demo[:8]])
    reference = encode_batch(model, images, out_dtype="float32")
    on_gpu = encode_batch(model.cuda(), images, autocast_dtype=torch.bfloat16, out_dtype="float32")
    np.testing.assert_allclose(on_gpu, reference, rtol=0.05, atol=0.05)


@pytest.mark.gpu
def test_bf16_text_context_on_cuda_is_close_to_fp32(tiny_open_clip):
    encoder, _ = load_text_encoder(TextEncoderConfig(kind="openclip", arch=tiny_open_clip))
    tokens = OpenCLIPTokenizer(16)(["a red circle", "a blue square on the left"]).numpy()
    reference = encode_text_batch(encoder, tokens).astype(np.float32)
    on_gpu = encode_text_batch(encoder.cuda(), tokens, autocast_dtype=torch.bfloat16).astype(np.float32)
    np.testing.assert_allclose(on_gpu, reference, rtol=0.05, atol=0.05)
