"""Shared test factories: tiny latent folders, real tiny training runs, random in-memory LDM bundles.

    write_latents(folder, encoder=None)           latent shards + manifest.json (formats.md)
    tiny_autoencoder(folder, seed=0)              a saved debug-kl first stage (pipeline/models/autoencoder.py)
    tiny_training_run(tmp_path, zero_stage=2)     a real `jobs.train` run of debug-t2i -> its run_dir
    tiny_bundle(preset="debug-t2i", seed=0)       an LDMBundle with random weights, no files

The latents are 4 smooth 16x16x4 patterns, each with its own caption tokens, so that the debug
text-to-image model has something learnable in seconds.
"""
import io
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ldm.autoencoder.config import AUTOENCODER_PRESETS
from ldm.autoencoder.model import build_autoencoder
from ldm.diffusion.layout import Box
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.unet import UNet
from ldm.presets import PRESETS, build_conditioner
from pipeline.conditions.layouts import LayoutConfig
from pipeline.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESET = PRESETS["debug-t2i"]
C, SIZE, L = PRESET.unet.out_channels, PRESET.latent_size, PRESET.conditioner.text.max_length
NUM_PATTERNS = 4
TOKENIZER = {"kind": "openclip", "name_or_path": None, "max_length": L}
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Two float32 forwards of the same network through different kernels (another implementation, batch
# split, CPU model or thread count) differ by up to ~3e-6 of the output's largest magnitude (measured
# on this suite's nets, on AVX-512 and with oneDNN capped at AVX2); an error in the computation itself
# differs by O(1) of it.
FLOAT32_REL = 2e-5
TEST_ENCODER = {"kind": "kl", "config": {}, "sha256": "test", "source": "test"}


# ---------------------------------------------------------------------------------------------- latents


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def pattern(index: int) -> np.ndarray:
    """A smooth [C, SIZE, SIZE] latent: one Gaussian blob per pattern, in a different quadrant."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    cy, cx = 0.25 + 0.5 * (index // 2), 0.25 + 0.5 * (index % 2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
    signs = np.array([1, -1, 1, -1])[:, None, None] * (1 if index % 2 else -1)
    return (2 * blob[None] * signs - 0.5 * signs).astype(np.float32)


def tokens_of(index: int) -> np.ndarray:
    tokens = np.zeros(L, dtype=np.int32)
    tokens[:4] = [49406, 320 + index, 1000 + index, 49407]  # <start> two words <end>, then 0-padding
    return tokens


def write_latents(folder: Path, num_samples: int = 64, num_shards: int = 4, encoder: dict | None = None,
                  scale_factor: float = 1.0) -> Path:
    """moments storage (mean, logvar = -10): z = mean + tiny noise, times `scale_factor`.

    `encoder`: the manifest's encoder identity (`load_autoencoder(...)[2]`); default a stub naming no file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    per_shard, shards = num_samples // num_shards, []
    for shard in range(num_shards):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            mean = pattern(i % NUM_PATTERNS)
            moments = np.concatenate([mean, np.full_like(mean, -10.0)]).astype(np.float16)
            samples.append({"__key__": f"{i:08d}", "latent.npy": npy_bytes(moments),
                            "txt": f"pattern {i % NUM_PATTERNS}".encode(), "json": b"{}",
                            "tokens.npy": npy_bytes(tokens_of(i % NUM_PATTERNS))})
        write_shard(folder / f"{shard:05d}.tar", samples)
        shards.append({"name": f"{shard:05d}.tar", "count": per_shard, "sha256": "", "source": ""})
    encoder = {k: (encoder or TEST_ENCODER)[k] for k in ("kind", "config", "sha256", "source")}
    factor = AUTOENCODER_PRESETS[PRESET.autoencoder].downsample_factor
    manifest = {"format": "ldm-pipeline/latents", "schema_version": 1, "encoder": encoder,
                "resolution": factor * SIZE, "crop": "center", "dtype": "float16", "storage": "moments",
                "latent_shape": [C, SIZE, SIZE], "scale_factor": scale_factor, "scale_factor_source": "config",
                "num_samples": num_samples, "shards": shards, "skipped": {}, "tokenizer": TOKENIZER}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


LAYOUT_C, LAYOUT_SIZE = PRESETS["debug-layout"].unet.out_channels, PRESETS["debug-layout"].latent_size
LAYOUT_POLICY = LayoutConfig("boxes", num_classes=LAYOUT_C)


def boxes_of(index: int) -> list[Box]:
    """One of 8 layouts: one or two quarter-size boxes in the quadrants, categories 0..LAYOUT_C-1."""
    k = index % 8
    first = Box(k % LAYOUT_C, 0.5 * (k % 2), 0.5 * (k // 2 % 2), 0.5, 0.5)
    if k < 4:
        return [first]
    return [first, Box((k + 1) % LAYOUT_C, 0.5 * (1 - k % 2), 0.5 * (1 - k // 2 % 2), 0.5, 0.5)]


def layout_latent(boxes: list[Box]) -> np.ndarray:
    """[C, SIZE, SIZE] of debug-layout in {-1, 1}: +1 inside each box, in its category's channel."""
    z = -np.ones((LAYOUT_C, LAYOUT_SIZE, LAYOUT_SIZE), np.float32)
    for b in boxes:
        rows = slice(round(b.y0 * LAYOUT_SIZE), round((b.y0 + b.h) * LAYOUT_SIZE))
        z[b.category, rows, round(b.x0 * LAYOUT_SIZE):round((b.x0 + b.w) * LAYOUT_SIZE)] = 1
    return z


def write_layout_latents(folder: Path, num_samples: int = 32, tokenizer: dict | None = None,
                         crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> Path:
    """A debug-layout latent folder as precompute layout.boxes_key writes it: sample i paints boxes_of(i)
    and stores its 92 tokens with the crop window `crop` (x0, y0, x1, y1)."""
    folder.mkdir(parents=True)
    samples = []
    for i in range(num_samples):
        tokens, _ = LAYOUT_POLICY.tokenizer.encode(boxes_of(i), crop)
        samples.append({"__key__": f"{i:06d}", "txt": b"", "json": b"{}",
                        "latent.npy": npy_bytes(layout_latent(boxes_of(i)).astype(np.float16)),
                        "tokens.npy": npy_bytes(tokens.numpy().astype(np.int32))})
    write_shard(folder / "00000.tar", samples)
    manifest = {"format": "ldm-pipeline/latents", "schema_version": 1,
                "encoder": {"source": "ours:x", "kind": "kl", "sha256": "0" * 64}, "resolution": 4 * LAYOUT_SIZE,
                "crop": "center", "dtype": "float16", "storage": "latents",
                "latent_shape": [LAYOUT_C, LAYOUT_SIZE, LAYOUT_SIZE], "scale_factor": 1.0,
                "scale_factor_source": "config", "num_samples": num_samples,
                "shards": [{"name": "00000.tar", "count": num_samples, "sha256": "", "source": ""}], "skipped": {},
                "tokenizer": tokenizer or LAYOUT_POLICY.spec(), "text_encoder": None, "images": None,
                "layout": {"objects_dropped": 0, "boxes_outside_crop": 0}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def perturb(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init (zero-initialised output layers included), so each path shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator))
    return module


def tiny_autoencoder(folder: Path, seed: int = 0) -> tuple[Path, dict]:
    """A debug-kl autoencoder with perturbed random weights saved in our format: (folder, identity)."""
    from pipeline.models.autoencoder import load_autoencoder, save_autoencoder

    cfg = AUTOENCODER_PRESETS[PRESET.autoencoder]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = perturb(build_autoencoder(cfg), generator)
    save_autoencoder(model, cfg, folder, scale_factor=1.0, source="tests/factories.py")
    return folder, load_autoencoder(folder)[2]


# ---------------------------------------------------------------------------------------------- training


def overrides_for(latent_dir: Path, run_dir: Path, max_steps: int, **extra) -> list[str]:
    values = {"data.path": latent_dir, "run_dir": run_dir, "trainer.max_steps": max_steps,
              "trainer.precision": "fp32", "trainer.deterministic": True, "trainer.ema_decay": 0.99,
              "data.batch_size": 8, "data.num_workers": 0, "optim.lr": 1e-3, "logger.mode": "disabled",
              "logger.log_every": 1, "logger.image_every": 10**6, "logger.progress_bar": False,
              "checkpoint.every_steps": 10**6} | extra
    return [f"{key}={value}" for key, value in values.items()]


def make_config(overrides: list[str]):
    """The validated TrainConfig of conf/train.yaml with `overrides` (Hydra compose, no app)."""
    from hydra import compose, initialize_config_dir

    import jobs.config
    from jobs.train.config import TrainConfig

    jobs.config.register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return jobs.config.to_dataclass(compose("train", overrides=overrides), TrainConfig)


@contextmanager
def single_process(num_threads: int = 1):
    """One rank on a fresh port (DeepSpeed needs RANK & co., else it looks for MPI) and one intra-op
    thread (on 2 shared cores, 2 threads stall each other); the environment comes back on exit."""
    from jobs.distributed import free_port

    saved = {key: os.environ.get(key) for key in LAUNCHER_VARS}
    threads = torch.get_num_threads()
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def torchrun_train(overrides: list[str], hydra_dir: Path, num_ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=num_ranks -m jobs.train ...` (gloo on CPU); asserts it succeeded."""
    from jobs.distributed import free_port

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_ranks}",
               f"--master_port={free_port()}", "-m", "jobs.train", *overrides, f"hydra.run.dir={hydra_dir}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tiny_training_run(tmp_path: Path, zero_stage: int = 2, steps: int = 2, *, num_ranks: int = 1,
                      train_text_encoder: bool = True, seed: int = 0, extra: dict | None = None) -> Path:
    """A real `jobs.train` run of debug-t2i (fp32, deterministic) on tiny latent shards whose manifest
    names a real saved debug-kl autoencoder (tmp_path/autoencoder); returns the run_dir
    (tmp_path/run). One rank runs in this process; num_ranks > 1 runs under torchrun. `extra`: more
    overrides ({"trainer.ema_decay": 0.0, ...})."""
    tmp_path = Path(tmp_path)
    _, identity = tiny_autoencoder(tmp_path / "autoencoder", seed)
    latents = write_latents(tmp_path / "latents", num_samples=16, num_shards=4, encoder=identity)
    run_dir = tmp_path / "run"
    overrides = overrides_for(latents, run_dir, steps, **{
        "trainer.zero_stage": zero_stage, "data.batch_size": 4 if num_ranks > 1 else 8, "seed": seed,
        "model.train_text_encoder": train_text_encoder} | (extra or {}))
    if num_ranks > 1:
        torchrun_train(overrides, tmp_path / "hydra", num_ranks)
        return run_dir
    from jobs.train.loop import train

    with single_process():
        code = train(make_config(overrides))
    assert code == 0, f"jobs.train exited with {code}"
    return run_dir


# ---------------------------------------------------------------------------------------------- bundles


def tiny_bundle(preset: str = "debug-t2i", seed: int = 0):
    """An LDMBundle of `preset` with random weights moved off their init (so zero-initialised output
    layers do not hide a path) and the preset's debug first stage; nothing is read or written."""
    from pipeline.models.bundle import LDMBundle

    p = PRESETS[preset]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet, conditioner = UNet(p.unet), build_conditioner(p.conditioner)
        autoencoder = build_autoencoder(AUTOENCODER_PRESETS[p.autoencoder])
    modules = [m for m in (unet, conditioner, autoencoder) if m is not None]
    for module in modules:
        perturb(module, generator).eval().requires_grad_(False)
    tokenizer = dict(TOKENIZER, max_length=p.conditioner.text.max_length) if p.conditioner.kind == "text" else None
    return LDMBundle(preset_name=preset, preset=p, unet=unet, conditioner=conditioner, autoencoder=autoencoder,
                     scale_factor=p.scale_factor or 1.0, tokenizer=tokenizer,
                     schedule=NoiseSchedule.from_config(p.schedule), objective=p.objective,
                     latent_shape=(p.unet.out_channels, p.latent_size, p.latent_size),
                     source={"kind": "factory", "path": None, "step": 0, "weights": "raw"})


# ---------------------------------------------------------------------------------------------- evaluation


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = FLOAT32_REL) -> None:
    """max |actual - expected| within `rel` of max |expected|: float32 rounding, never a real change."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"max abs difference {error:.3g} > {rel:g} x max |expected| {scale:.3g}"


def make_inception_weights(path: Path, calibration_N3HW: torch.Tensor) -> Path:
    """torch-fidelity's Inception network randomly initialised (no hub here), its batch-norm statistics
    set from one batch of images (else a random 50-layer net's features vanish to ~1e-8 and every
    metric is ~0), saved the way torch-fidelity loads it.

    The features are O(1) only on images like the calibration batch: calibrated on 4 scenes, grainy
    scenes and noise give features of 10-100 and a KID of ~1e8, where float32 rounding alone moves
    a metric past any sane tolerance. Calibrate on every kind of image the test feeds it
    (inception_calibration)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative: the statistics of exactly this batch
    net.train()
    with torch.no_grad():
        net(calibration_N3HW)
    torch.save(net.state_dict(), path)
    return path


def inception_calibration(*image_sets: list[np.ndarray], per_set: int = 6, noise: int = 4) -> torch.Tensor:
    """The batch make_inception_weights calibrates on: the first `per_set` images of each set and
    `noise` uniform-noise images (what an untrained model's samples look like), as uint8 [N, 3, H, W]."""
    images = [image for images in image_sets for image in images[:per_set]]
    shape = images[0].shape
    images += [np.random.default_rng([7, i]).integers(0, 256, shape, dtype=np.uint8) for i in range(noise)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def scene(index: int, seed: int, grain: float, size: int = 32) -> np.ndarray:
    """Demo scene `index` of `seed` as an HxWx3 uint8 array, with Gaussian grain of std `grain`."""
    from jobs.demo.scenes import render, scene_for_index

    rng = np.random.default_rng([seed, index])
    image = np.asarray(render(scene_for_index(index, seed), size=size, rng=rng), dtype=np.float32)
    return np.clip(image + rng.normal(0, grain, image.shape), 0, 255).astype(np.uint8)


def png_bytes(image_HW3: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_HW3).save(buffer, format="PNG")
    return buffer.getvalue()


def write_lpips_files(out_dir: Path) -> tuple[Path, Path]:
    """Random LPIPS weights in the real files' layouts: torchvision VGG16 keys and v0.1 heads
    (made non-negative, as learned heads are, so that the distance is one)."""
    from ldm.autoencoder.lpips import LPIPS

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lpips = LPIPS()
    vgg = {f"features.{k.split('.', 1)[1]}": v for k, v in lpips.net.state_dict().items()}
    heads = {k: v.abs() for k, v in lpips.state_dict().items() if k.startswith("lin")}
    torch.save(vgg, out_dir / "vgg16.pth")
    torch.save(heads, out_dir / "heads.pth")
    return out_dir / "vgg16.pth", out_dir / "heads.pth"


def spatial_train_overrides(model: str, data: str, latent_dir: Path, run_dir: Path, max_steps: int,
                            **extra) -> list[str]:
    """Overrides of a short deterministic fp32 run of a spatially conditioned debug model (SR,
    inpainting, semantic): one process, no loader workers, a sample grid at the last step."""
    values = {"model": model, "data": data, "data.path": latent_dir, "run_dir": run_dir,
              "trainer.max_steps": max_steps, "trainer.precision": "fp32", "trainer.deterministic": True,
              "trainer.ema_decay": 0.9, "trainer.guidance_scale": 1.0, "data.batch_size": 8, "data.num_workers": 0,
              "optim.lr": 1e-3, "logger.mode": "disabled", "logger.log_every": 1, "logger.image_every": max_steps,
              "logger.progress_bar": False, "trainer.num_samples": 3, "trainer.sample_steps": 2} | extra
    return [f"{key}={value}" for key, value in values.items()]


def run_train(env, overrides: list[str]) -> int:
    """jobs.train in this process, after `env` (conftest's single_process_env) set up one rank."""
    from jobs.train.loop import train

    env()
    return train(make_config(overrides))


def logged_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def held_out_loss(models, run_dir: Path, data_cfg, shuffle: bool, loss_type: str = "l1") -> float:
    """Eq. 2 of a run's last EMA weights on the loader's first batch, 8 noise draws, each sample with
    its own spatial condition or (shuffle) with its neighbour's: how much the model uses it."""
    from safetensors.torch import load_file

    from jobs.checkpointing import CheckpointManager
    from ldm.diffusion.objectives import diffusion_loss
    from pipeline.latents.loader import LatentLoader

    ema = load_file(str(CheckpointManager(run_dir / "checkpoints").latest() / "ema.safetensors"))
    ema.pop("num_updates")
    models.module.load_state_dict(ema, strict=False)
    models.module.eval()
    batch = next(iter(LatentLoader(data_cfg)))
    with torch.no_grad():
        c = models.frozen_conditioner(batch["concat"]) if models.frozen_conditioner is not None else batch["concat"]
        if shuffle:
            c = c.roll(1, dims=0)
        generator = torch.Generator().manual_seed(0)
        values = [diffusion_loss(lambda z_t, t_B: models.module(z_t, t_B, c), batch["z"], models.schedule,
                                 loss_type=loss_type, generator=generator).mean() for _ in range(8)]
    return float(torch.stack(values).mean())
