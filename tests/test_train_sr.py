"""x4 super-resolution training (Sec. 4.4): the low-res condition made by the loader from each sample's
stored HR crop (seeded per seed, epoch and sample, so resume is exact), concatenated to z_t in the
UNet; the paper's experiments; errors before any work. One rank in this process, tiny shards whose
latents are a function of the image (its 4x4 block means), so the condition carries what the model
must predict."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from factories import logged_losses, make_config, run_train, spatial_train_overrides

from jobs.checkpointing import CheckpointManager
from jobs.train.setup import build_models
from ldm.diffusion.objectives import diffusion_loss
from ldm.presets import PRESETS
from pipeline.latents.loader import LatentLoader
from pipeline.shards import write_shard

PRESET = PRESETS["debug-sr"]
C, SIZE = PRESET.unet.out_channels, PRESET.latent_size
HR = 4 * SIZE


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _png(image_HW3: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_HW3).save(buffer, "PNG")
    return buffer.getvalue()


def hr_image(index: int, size: int = HR) -> np.ndarray:
    """uint8 [size, size, 3]: a smooth field from a 4x4 grid of random colours."""
    grid = np.random.default_rng(index).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def latent_of(image_HW3: np.ndarray) -> np.ndarray:
    """[C, SIZE, SIZE]: the image's 4x4 block means in [-1, 1], and their mean over colours."""
    x = image_HW3.astype(np.float32) / 127.5 - 1
    size = x.shape[0] // 4
    blocks = x.reshape(size, 4, size, 4, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    return np.concatenate([blocks, blocks.mean(axis=0, keepdims=True)]).astype(np.float16)


def write_sr_latents(folder: Path, num_samples: int = 32, *, resolution: int = HR, keep_images: bool = True,
                     drop_image_of: str | None = None) -> Path:
    """VQ-style latent shards (storage "latents") + KEY.image.png, in two shards."""
    folder.mkdir(parents=True)
    shards = []
    for shard in range(2):
        samples = []
        for i in range(shard * num_samples // 2, (shard + 1) * num_samples // 2):
            image = hr_image(i, resolution)
            sample = {"__key__": f"{i:06d}", "txt": b"", "json": b"{}",
                      "latent.npy": _npy(latent_of(hr_image(i)))}
            if keep_images and sample["__key__"] != drop_image_of:
                sample["image.png"] = _png(image)
            samples.append(sample)
        write_shard(folder / f"{shard:05d}.tar", samples)
        shards.append({"name": f"{shard:05d}.tar", "count": len(samples), "sha256": "", "source": ""})
    images = {"min_crop_fraction": 1.0, "max_crop_fraction": 1.0, "resize_filter": "bicubic",
              "keep_images": keep_images}
    manifest = {"format": "ldm-pipeline/latents", "schema_version": 1,
                "encoder": {"kind": "vq", "config": {}, "sha256": "test", "source": "test"},
                "resolution": resolution, "crop": "center", "dtype": "float16", "storage": "latents",
                "latent_shape": [C, SIZE, SIZE], "scale_factor": 1.0, "scale_factor_source": "config",
                "num_samples": num_samples, "shards": shards, "skipped": {}, "tokenizer": None,
                "text_encoder": None, "images": images}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def sr_latents(tmp_path_factory) -> Path:
    return write_sr_latents(tmp_path_factory.mktemp("sr") / "latents")


def overrides_for(latent_dir: Path, run_dir: Path, max_steps: int, **extra) -> list[str]:
    return spatial_train_overrides("debug-sr", "sr", latent_dir, run_dir, max_steps, **extra)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("experiment, condition", [("sr-bicubic", "sr-bicubic"), ("sr-bsr", "sr-bsr")])
def test_paper_experiments_compose_with_tab15_settings(experiment, condition):
    cfg = make_config([f"experiment={experiment}", "data.path=data/latents"])
    assert (cfg.model.preset, cfg.data.condition, cfg.condition_key) == ("ldm-vq4-sr", condition, "concat")
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.trainer.global_batch_size) == (6.4e-5, 860_000, 64)
    assert PRESETS[cfg.model.preset].unet.in_channels == 6 and cfg.model.cond_dropout == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["model=debug-sr"], r"concatenates a condition to z_t: set data.condition"),
    (["data.condition=sr-bsr"], r"data.condition='sr-bsr' is concatenated to z_t.*'text' conditioner"),
    (["model=debug-sr", "data=sr", "data.condition=sr-x8"], r"data.condition='sr-x8': use null or one of"),
])
def test_config_errors_name_what_to_set(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(["data.path=x", "trainer.max_steps=1", *overrides])


# ---------------------------------------------------------------------------------------------- loader


def _loader(path: Path, condition: str = "sr-bsr", seed: int = 0) -> LatentLoader:
    cfg = make_config(overrides_for(path, Path("r"), 1, **{"data.condition": condition, "data.seed": seed}))
    return LatentLoader(cfg.data)


def test_the_loader_redraws_the_condition_each_epoch_and_resumes_it_exactly(sr_latents):
    loader = _loader(sr_latents)
    batches = iter(loader)
    first = [next(batches) for _ in range(loader.batches_per_epoch + 2)]  # into the second epoch
    assert first[0]["concat"].shape == (8, 3, SIZE, SIZE) and first[0]["concat"].dtype == torch.float32
    stopped = _loader(sr_latents)  # consumed one batch, then the process ended
    next(iter(stopped))
    resumed = _loader(sr_latents)
    resumed.load_state_dict(stopped.state_dict())
    for expected, got in zip(first[1:], iter(resumed)):  # the same conditions as the uninterrupted stream
        assert torch.equal(expected["sample_id"], got["sample_id"])
        assert torch.equal(expected["concat"], got["concat"])
    by_epoch = {}
    for batch in first:
        for sample_id, c in zip(batch["sample_id"].tolist(), batch["concat"]):
            by_epoch.setdefault(sample_id, []).append(c)
    twice = [cs for cs in by_epoch.values() if len(cs) == 2]
    assert twice and all(not torch.equal(a, b) for a, b in twice)  # BSR draws anew each epoch
    bicubic = iter(_loader(sr_latents, "sr-bicubic"))
    batch = next(bicubic)
    low = [np.asarray(Image.fromarray(hr_image(int(i))).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
           for i in batch["sample_id"]]
    expected = torch.from_numpy(np.stack(low).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - 1)
    assert torch.equal(batch["concat"], expected)


def test_latents_without_images_or_a_sample_without_its_image_fail_naming_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="precomputed without them: rerun jobs.precompute with keep_images=true"):
        _loader(write_sr_latents(tmp_path / "plain", keep_images=False))
    broken = write_sr_latents(tmp_path / "broken", drop_image_of="000003")
    with pytest.raises(ValueError, match=r"00000.tar: sample '000003' has no .image.png"):
        next(iter(_loader(broken)))


def test_low_res_size_that_does_not_fit_the_latents_fails_before_training(tmp_path, single_process_env):
    latents = write_sr_latents(tmp_path / "small", resolution=2 * HR)  # 128 px crops: 32 px inputs
    with pytest.raises(ValueError, match=r"makes 32x32 RGB images from the 128 px crops .* at 16x16"):
        run_train(single_process_env, overrides_for(latents, tmp_path / "run", 1))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- training


def _held_out_loss(run_dir: Path, latents: Path, shuffle: bool) -> float:
    """Eq. 2 of the run's EMA weights on every sample, 8 noise draws each, with its own low-res
    condition or with another sample's."""
    cfg = make_config(overrides_for(latents, run_dir, 1, **{"data.condition": "sr-bicubic"}))
    models = build_models(cfg, torch.device("cpu"))
    ema = load_file(str(CheckpointManager(run_dir / "checkpoints").latest() / "ema.safetensors"))
    ema.pop("num_updates")
    models.module.load_state_dict(ema, strict=False)
    models.module.eval()
    batch = next(iter(LatentLoader(cfg.data)))
    z_0, c = batch["z"], batch["concat"]
    if shuffle:
        c = c.roll(1, dims=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        values = [diffusion_loss(lambda z_t, t_B: models.module(z_t, t_B, c), z_0, models.schedule,
                                 generator=generator).mean() for _ in range(8)]
    return float(torch.stack(values).mean())


@pytest.mark.slow
def test_training_on_low_res_conditions_lowers_the_loss_and_uses_the_condition(tmp_path, sr_latents,
                                                                               single_process_env):
    """Measured: loss 0.85 -> 0.063 (means of the first and last 10 steps); held-out loss 0.079 with
    each sample's own low-res image, 0.243 with its neighbour's."""
    run_dir = tmp_path / "run"
    assert run_train(single_process_env, overrides_for(sr_latents, run_dir, 80, **{"data.condition": "sr-bicubic",
                                                                                    "logger.image_every": 80})) == 0
    values = logged_losses(run_dir)
    first, last = np.mean(values[:10]), np.mean(values[-10:])
    assert last < 0.6 * first, (first, last)
    own, other = _held_out_loss(run_dir, sr_latents, False), _held_out_loss(run_dir, sr_latents, True)
    assert own < 0.8 * other, (own, other)  # its own low-res image tells the model more than another's
    grid = np.asarray(Image.open(run_dir / "images" / "samples_00000080.png"))
    assert grid.shape[1] == 6 * (grid.shape[0] + 2) - 2  # one row of 3 low-res | sample pairs (2 px gaps)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_with_bsr_conditions_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, sr_latents,
                                                                             single_process_env, stage):
    """Under each ZeRO stage (one rank here; 2-rank ZeRO is test_train's, whose batches hold tokens)."""
    extra = {"checkpoint.every_steps": 3, "trainer.zero_stage": stage}
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(single_process_env, overrides_for(sr_latents, straight, 6, **extra)) == 0
    run_train(single_process_env, overrides_for(sr_latents, split, 6, **extra, **{"trainer.stop_after_steps": 4}))
    assert run_train(single_process_env, overrides_for(sr_latents, split, 6, **extra)) == 0
    assert logged_losses(split) == logged_losses(straight) and len(logged_losses(straight)) == 6
    a, b = (load_file(str(CheckpointManager(d / "checkpoints").latest() / "ema.safetensors")) for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
