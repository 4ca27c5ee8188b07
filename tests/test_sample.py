"""Sampling: jobs/sample/generate.py and `python -m jobs.sample`.

Models are tests/factories.tiny_bundle (random weights moved off their init, debug presets, 64x64
images from 16x16 latents), saved with pipeline.models.bundle.save_ldm where the job needs a source.
Samples are compared as latents (float, before decoding) where batching may change float rounding,
and as PNGs (uint8) where the job is compared with itself.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import CONF, LAUNCHER_VARS, ROOT, assert_float32_close, perturb, tiny_bundle, write_lpips_files
from hydra import compose, initialize_config_dir
from PIL import Image

import jobs.config
from jobs.distributed import free_port
from jobs.sample.conditions import Conditions
from jobs.sample.config import SampleConfig
from jobs.sample.generate import (
    SamplingConfig,
    generate,
    initial_noise,
    sample_generators,
)
from jobs.sample.run import sample, write_png
from ldm.diffusion.conditioners import ConcatConditioner
from ldm.diffusion.guidance import downsample
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.unet import UNet, UNetConfig
from ldm.presets import DEBUG_UNET, PRESETS, ConditionerConfig, LDMPreset
from pipeline.models.bundle import LDMBundle, save_ldm

CPU = torch.device("cpu")
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
FAST = SamplingConfig(num_steps=4, guidance_scale=3.0, batch_size=4)
jobs.config.register_schemas()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t2i():
    return tiny_bundle("debug-t2i")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return save_ldm(tiny_bundle("debug-t2i"), tmp_path_factory.mktemp("export") / "t2i")


def latents(bundle, conditions, seeds, cfg=FAST):
    return generate(bundle, conditions, seeds, cfg, CPU, output="latents")


# ------------------------------------------------------------------------------------ determinism


def test_same_seeds_give_the_same_samples_and_other_seeds_do_not(t2i):
    conditions = Conditions(prompts=PROMPTS[:2])
    first = generate(t2i, conditions, [5, 6], FAST, CPU)
    assert first.dtype == torch.uint8 and first.shape == (2, 64, 64, 3)
    assert torch.equal(first, generate(t2i, conditions, [5, 6], FAST, CPU))
    other = generate(t2i, conditions, [7, 8], FAST, CPU)
    assert (first.float() - other.float()).abs().mean() > 5  # a different seed is a different image


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("plms", 0.0)])
def test_a_sample_depends_on_its_seed_not_on_its_batch(t2i, sampler, eta):
    """Per-sample generators: the same latents from one batch of 5, batches of 2, or alone in another
    company, also for the samplers that draw noise at every step (DDPM, DDIM eta=1)."""
    cfg = dataclasses.replace(FAST, sampler=sampler, eta=eta, batch_size=5)
    prompts = [PROMPTS[i % 3] for i in range(5)]
    whole = latents(t2i, Conditions(prompts=prompts), range(10, 15), cfg)
    pairs = latents(t2i, Conditions(prompts=prompts), range(10, 15), dataclasses.replace(cfg, batch_size=2))
    shuffled = latents(t2i, Conditions(prompts=[prompts[3], prompts[1]]), [13, 11], cfg)
    assert_float32_close(pairs, whole)  # batching may change float rounding in the UNet's kernels, never more
    assert_float32_close(shuffled, whole[[3, 1]])
    assert not torch.allclose(whole[0], whole[3], atol=0.1)


def test_guidance_scale_one_is_the_conditional_model_alone(t2i):
    prompts, seeds = PROMPTS[:2], [3, 4]
    cfg = dataclasses.replace(FAST, guidance_scale=1.0)
    ours = latents(t2i, Conditions(prompts=prompts), seeds, cfg)
    context = t2i.conditioner(_openclip(t2i)(prompts))
    z_T = initial_noise(sample_generators(seeds), t2i.latent_shape)
    with torch.no_grad():
        direct = sample_ddim(lambda z, t: t2i.unet(z, t, context), z_T, t2i.schedule, num_steps=cfg.num_steps)
    assert torch.equal(ours, direct)
    guided = latents(t2i, Conditions(prompts=prompts), seeds, dataclasses.replace(FAST, guidance_scale=4.0))
    assert not torch.allclose(guided, ours, atol=1e-3)


def test_bf16_autocast_runs_the_model_in_bf16_and_stays_close_to_fp32(t2i):
    conditions, seeds = Conditions(prompts=PROMPTS[:2]), [0, 1]
    fp32 = latents(t2i, conditions, seeds)
    bf16 = latents(t2i, conditions, seeds, dataclasses.replace(FAST, precision="bf16"))
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().mean() < 0.02 * fp32.std()


@pytest.mark.gpu
def test_cuda_samples_equal_cpu_samples_from_the_same_seeds():
    """The noise comes from CPU generators, so a seed means the same sample on any device."""
    bundle, conditions = tiny_bundle("debug-t2i"), Conditions(prompts=PROMPTS)
    cpu = latents(bundle, conditions, [0, 1, 2])
    cuda = generate(bundle, conditions, [0, 1, 2], FAST, torch.device("cuda"), output="latents")
    # TF32 convolutions on CUDA round differently; another noise would differ by about one std
    assert (cuda - cpu).abs().mean() < 0.01 * cpu.std()


def _openclip(bundle):
    from ldm.diffusion.tokenizers import build_tokenizer

    spec = bundle.tokenizer
    return build_tokenizer(spec["kind"], spec["name_or_path"], spec["max_length"])


# ------------------------------------------------------------------------ sizes, kinds, bad inputs


def test_convolutional_sampling_returns_the_requested_non_square_size(t2i):
    """Sec. 4.3.2: a model trained on 16x16 latents (64x64 images) samples a 16x32 latent."""
    cfg = dataclasses.replace(FAST, height=64, width=128)
    images = generate(t2i, Conditions(prompts=PROMPTS[:1]), [0], cfg, CPU)
    assert images.shape == (1, 64, 128, 3)
    assert latents(t2i, Conditions(prompts=PROMPTS[:1]), [0], cfg).shape == (1, 4, 16, 32)
    assert images.float().std() > 1  # not a constant picture


def test_class_models_guide_with_the_null_class_and_unconditional_models_take_no_condition():
    cin = tiny_bundle("debug-cin")
    by_class = latents(cin, Conditions(class_ids=[1, 2]), [0, 0])
    assert not torch.allclose(by_class[0], by_class[1], atol=1e-3)  # same noise, another class
    uncond = tiny_bundle("debug-uncond")
    images = generate(uncond, Conditions(), [0, 1], dataclasses.replace(FAST, guidance_scale=1.0), CPU)
    assert images.shape == (2, 64, 64, 3)


def test_super_resolution_concatenates_the_low_res_image_on_the_latent_grid():
    """Sec. 4.4: the low-res image (here 16x16) is concatenated with z_t; output = 16 x f = 64 px."""
    sr, lowres = tiny_bundle("debug-sr"), torch.rand(2, 3, 16, 16) * 2 - 1
    cfg = dataclasses.replace(FAST, guidance_scale=1.0)
    out = latents(sr, Conditions(images=lowres), [0, 0], cfg)
    assert out.shape == (2, 4, 16, 16) and not torch.allclose(out[0], out[1], atol=1e-3)
    bigger = generate(sr, Conditions(images=torch.zeros(1, 3, 24, 24)), [0], cfg, CPU)
    assert bigger.shape == (1, 96, 96, 3)  # convolutional sampling: a 24x24 input, a 24x24 latent (Sec. 4.3.2)
    with pytest.raises(ValueError, match=r"low-res images are 16x16, which x f=4 gives 64x64: .* of 24x24"):
        generate(sr, Conditions(images=lowres[:1]), [0], dataclasses.replace(cfg, height=96, width=96), CPU)


def inpainting_bundle() -> LDMBundle:
    """A debug inpainting model: c = [first-stage latent of the masked image (4), mask (1)] (Sec. 4.5)."""
    base = tiny_bundle("debug-cin")  # its debug-kl first stage and schedule
    preset = LDMPreset(UNetConfig(9, 4, **DEBUG_UNET), "debug-kl", 16, PRESETS["debug-cin"].schedule,
                       ConditionerConfig("concat", concat_channels=5))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = perturb(UNet(preset.unet), torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    return dataclasses.replace(base, preset_name="debug-inpainting", preset=preset, unet=unet,
                               conditioner=ConcatConditioner(5), tokenizer=None)


def test_inpainting_keeps_the_known_pixels_and_fills_the_mask():
    bundle = inpainting_bundle()
    image = torch.linspace(-1, 1, 64).repeat(1, 3, 64, 1)  # [1, 3, 64, 64], a horizontal ramp
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    cfg = dataclasses.replace(FAST, guidance_scale=1.0)
    out = generate(bundle, Conditions(images=image, masks=mask), [0], cfg, CPU)
    known = ((image + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    keep = mask[0, 0] == 0
    assert torch.equal(out[0][keep], known[0][keep])
    assert not torch.equal(out[0][~keep], known[0][~keep])
    # Convolutional sampling at twice the training size (Sec. 4.3.2): a 128 px image, a 32x32 latent.
    big_image, big_mask = F.interpolate(image, scale_factor=2), F.interpolate(mask, scale_factor=2)
    big = generate(bundle, Conditions(images=big_image, masks=big_mask), [0], cfg, CPU)
    big_known = ((big_image + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert big.shape == (1, 128, 128, 3) and torch.equal(big[0][big_mask[0, 0] == 0], big_known[0][big_mask[0, 0] == 0])


@pytest.mark.parametrize("preset, conditions, cfg, output, match", [
    ("debug-t2i", Conditions(prompts=["x"]), {"height": 68}, "images", r"sampling.height=68 is not a multiple of 8"),
    ("debug-t2i", Conditions(prompts=["x"]), {"width": 100}, "images", r"set sampling.width to e.g. 96"),
    ("debug-cin", Conditions(prompts=["x"]), {}, "images", r"class-conditional: it takes class_ids, not prompts"),
    ("debug-t2i", Conditions(class_ids=[1]), {}, "images", r"text-conditional: it takes prompts"),
    ("debug-t2i", Conditions(), {}, "images", r"text-conditional: pass prompts"),
    ("debug-uncond", Conditions(prompts=["x"]), {}, "images", r"unconditional: it takes no conditions"),
    ("debug-uncond", Conditions(), {"guidance_scale": 3.0}, "images", r"set sampling.guidance_scale=1"),
    ("debug-cin", Conditions(class_ids=[10]), {}, "images", r"class_ids \[10\] outside \[0, 10\)"),
    ("debug-sr", Conditions(images=torch.zeros(1, 3, 16, 16), masks=torch.zeros(1, 1, 16, 16)), {}, "images",
     r"not an inpainting model"),
    ("debug-t2i", Conditions(prompts=["x", "y"]), {}, "images", r"2 conditions for 1 seeds"),
    ("debug-t2i", Conditions(prompts=["x"]), {}, "pixels", r"output='pixels'"),
])
def test_bad_requests_fail_before_sampling_saying_what_to_change(preset, conditions, cfg, output, match):
    bundle = tiny_bundle(preset)
    with pytest.raises(ValueError, match=match):
        generate(bundle, conditions, [0], dataclasses.replace(FAST, **cfg), CPU, output=output)


def test_a_model_without_autoencoder_gives_latents_and_says_why_not_images(t2i):
    bundle = dataclasses.replace(t2i, autoencoder=None)
    with pytest.raises(ValueError, match=r"no first-stage autoencoder.*autoencoder=.*output='latents'"):
        generate(bundle, Conditions(prompts=["x"]), [0], FAST, CPU)
    assert latents(bundle, Conditions(prompts=["x"]), [0]).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("key, value, match", [
    ("sampler", "euler", "sampling.sampler"), ("eta", 0.5, "sampling.eta=0.5 applies to sampler=ddim only"),
    ("precision", "fp16", "sampling.precision"), ("height", 0, "sampling.height"), ("batch_size", 0, "batch_size")])
def test_sampling_config_checks_name_the_key(key, value, match):
    base = {"sampler": "plms"} if key == "eta" else {}
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**base, **{key: value})


# ------------------------------------------------------------------------------------------ the job


# tiny_bundle exports hold its raw weights
JOB_DEFAULTS = {"sampling.num_steps": 3, "sampling.batch_size": 3, "progress_bar": False, "device": "cpu",
                "weights": "raw"}


def job_config(**overrides) -> SampleConfig:
    values = JOB_DEFAULTS | overrides
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=[f"{k}={v}" for k, v in values.items()])
    return jobs.config.to_dataclass(cfg, SampleConfig)


def read_pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))}


@pytest.mark.parametrize("sampler", ["ddim", "plms", "ddpm"])
def test_job_writes_pngs_grid_and_samples_json(tmp_path, export, sampler):
    out = tmp_path / "out"
    summary = sample(job_config(source=export, out_dir=out, prompts="[a red circle,a blue square]",
                                num_per_prompt=2, seed=100, **{"sampling.sampler": sampler,
                                                               "sampling.guidance_scale": 2.0}))
    assert summary["num_samples"] == 4 and summary["image_size"] == [64, 64]
    assert set(read_pngs(out)) == {"000000.png", "000001.png", "000002.png", "000003.png"}
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64 + 2, 2 * 64 + 2)  # one row per prompt, num_per_prompt columns, 2 px gaps
    record = json.loads((out / "samples.json").read_text())
    assert record["sampling"]["sampler"] == sampler and record["sampling"]["guidance_scale"] == 2.0
    assert record["source"]["path"] == str(export) and record["preset"] == "debug-t2i"
    assert record["seed_rule"] == "sample seed = seed + global index"
    assert [(s["index"], s["seed"], s["prompt"], s["file"]) for s in record["samples"]] == [
        (0, 100, "a red circle", "000000.png"), (1, 101, "a red circle", "000001.png"),
        (2, 102, "a blue square", "000002.png"), (3, 103, "a blue square", "000003.png")]


def test_one_index_regenerates_its_sample_and_merges_into_samples_json(tmp_path, export):
    out, prompts = tmp_path / "out", "[a red circle,a blue square]"
    sample(job_config(source=export, out_dir=out, prompts=prompts, num_per_prompt=2))
    first = read_pngs(out)
    (out / "000002.png").unlink()
    sample(job_config(source=export, out_dir=out, prompts=prompts, num_per_prompt=2, indices="[2]",
                      **{"sampling.batch_size": 1}))
    assert np.abs(read_pngs(out)["000002.png"].astype(int) - first["000002.png"]).max() <= 1
    record = json.loads((out / "samples.json").read_text())
    assert [s["index"] for s in record["samples"]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"other settings \(sampling\)"):
        sample(job_config(source=export, out_dir=out, prompts=prompts, num_per_prompt=2, indices="[2]",
                          **{"sampling.num_steps": 5}))


def test_job_samples_class_and_super_resolution_models(tmp_path):
    cin = save_ldm(tiny_bundle("debug-cin"), tmp_path / "cin")
    sample(job_config(source=cin, out_dir=tmp_path / "classes", class_ids="[3,1]", num_per_prompt=1,
                      **{"sampling.guidance_scale": 2.0}))
    record = json.loads((tmp_path / "classes" / "samples.json").read_text())
    assert [(s["index"], s["class_id"]) for s in record["samples"]] == [(0, 3), (1, 1)]
    lowres = tmp_path / "lowres"
    lowres.mkdir()
    for name, colour in (("b.png", (0, 0, 255)), ("a.png", (255, 0, 0))):
        Image.new("RGB", (16, 16), colour).save(lowres / name)
    sr = save_ldm(tiny_bundle("debug-sr"), tmp_path / "sr")
    sample(job_config(source=sr, out_dir=tmp_path / "sr_out", images=lowres, num_per_prompt=1))
    record = json.loads((tmp_path / "sr_out" / "samples.json").read_text())
    assert [Path(s["image"]).name for s in record["samples"]] == ["a.png", "b.png"]  # sorted file order
    assert record["image_size"] == [64, 64]  # 16 x f
    pngs = read_pngs(tmp_path / "sr_out")
    assert [p.shape for p in pngs.values()] == [(64, 64, 3)] * 2
    assert np.abs(pngs["000000.png"].astype(int) - pngs["000001.png"]).mean() > 1  # the input matters


def test_job_rejects_conditions_the_model_does_not_take_before_writing(tmp_path, export):
    with pytest.raises(ValueError, match="takes prompts / prompt_file, not class_ids"):
        sample(job_config(source=export, out_dir=tmp_path / "out", class_ids="[1,2]"))
    with pytest.raises(ValueError, match=r"indices \[9\] out of range"):
        sample(job_config(source=export, out_dir=tmp_path / "out", prompts="[a]", indices="[9]"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="set only one of prompts, prompt_file"):
        job_config(source=export, out_dir=tmp_path / "out", prompts="[a]", class_ids="[1]")


@pytest.mark.slow
def test_two_ranks_make_the_same_images_as_one(tmp_path, export):
    """torchrun, 2 CPU ranks (gloo): rank r samples indices r, r+2, ...; the same PNGs as one process
    with another batch size, and samples.json lists every index once."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle\n\na blue square\na green triangle\n")
    common = {"source": export, "prompt_file": prompt_file, "num_per_prompt": 2, "seed": 7,
              "sampling.guidance_scale": 3.0}
    sample(job_config(out_dir=tmp_path / "one", **common, **{"sampling.batch_size": 4}))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"OMP_NUM_THREADS": "1"}
    two = JOB_DEFAULTS | common | {"out_dir": tmp_path / "two", "sampling.batch_size": 2,
                                   "hydra.run.dir": tmp_path / "hydra"}
    args = [f"{k}={v}" for k, v in two.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "jobs.sample", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["num_samples"] == 6
    one, two = read_pngs(tmp_path / "one"), read_pngs(tmp_path / "two")
    assert set(one) == set(two) == {f"{i:06d}.png" for i in range(6)}
    for name in one:
        diff = np.abs(one[name].astype(int) - two[name].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, name
    record = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert [s["prompt"] for s in record["samples"]] == [p for p in PROMPTS for _ in range(2)]


def test_a_mask_of_another_size_than_its_image_fails_naming_both_files_and_the_keys(tmp_path):
    from jobs.sample.run import build_plan

    for folder, size, mode in (("images", 64, "RGB"), ("masks", 32, "L")):
        (tmp_path / folder).mkdir()
        Image.new(mode, (size, size)).save(tmp_path / folder / "000001.png")
    cfg = job_config(source=tmp_path, out_dir=tmp_path / "out", images=tmp_path / "images", masks=tmp_path / "masks")
    with pytest.raises(ValueError, match=r"masks=.*masks': 000001.png is 32x32, its image 000001.png \(images=.*\) "
                                         r"is 64x64: give each mask its image's size"):
        build_plan(cfg)


def test_semantic_maps_condition_the_sample_and_a_larger_map_samples_a_larger_image():
    """Sec. 4.3.2: the one-hot map through the trained rescaler joins z_t; the empty map (no class) is
    the unconditional branch; a 96 px map samples a 96 px image (convolutional sampling)."""
    from jobs.sample.conditions import condition_pair, one_hot_maps

    bundle = tiny_bundle("debug-semantic")
    maps = torch.zeros(2, 64, 64, dtype=torch.long)
    maps[1, :, 32:] = 3
    cond, uncond = condition_pair(bundle, Conditions(maps=maps), (16, 16), CPU)
    torch.testing.assert_close(cond["concat"], bundle.conditioner(one_hot_maps(maps, 4)))
    assert cond["concat"].shape == (2, 3, 16, 16) and not uncond["concat"].any()
    cfg = dataclasses.replace(FAST, guidance_scale=1.0)
    out = latents(bundle, Conditions(maps=maps), [0, 0], cfg)
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # the same noise, another map
    bigger = generate(bundle, Conditions(maps=torch.zeros(1, 96, 96, dtype=torch.long)), [0], cfg, CPU)
    assert bigger.shape == (1, 96, 96, 3)
    with pytest.raises(ValueError, match=r"maps hold class ids 4..7, preset 'debug-semantic' reads 4 classes"):
        generate(bundle, Conditions(maps=maps + 4), [0, 0], cfg, CPU)
    with pytest.raises(ValueError, match=r"sampling.height/width=128x128 differ from the segmentation map"):
        generate(bundle, Conditions(maps=maps[:1]), [0], dataclasses.replace(cfg, height=128, width=128), CPU)


def test_job_samples_from_map_files_and_names_a_map_with_a_class_beyond_the_model(tmp_path):
    semantic = save_ldm(tiny_bundle("debug-semantic"), tmp_path / "semantic")
    maps = tmp_path / "maps"
    maps.mkdir()
    for name, value in (("b.png", 2), ("a.png", 1)):
        Image.fromarray(np.full((64, 64), value, np.uint8)).save(maps / name)
    sample(job_config(source=semantic, out_dir=tmp_path / "out", maps=maps, num_per_prompt=1))
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [Path(s["map"]).name for s in record["samples"]] == ["a.png", "b.png"] and record["image_size"] == [64, 64]
    pngs = read_pngs(tmp_path / "out")
    assert np.abs(pngs["000000.png"].astype(int) - pngs["000001.png"]).mean() > 1  # the map matters
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(maps / "c.png")
    with pytest.raises(ValueError, match=r"maps: .*c.png holds class id 9, preset 'debug-semantic' reads 4 classes"):
        sample(job_config(source=semantic, out_dir=tmp_path / "out2", maps=maps, num_per_prompt=1))
    Image.new("RGB", (64, 64)).save(maps / "d.png")
    with pytest.raises(ValueError, match=r"d.png is a RGB image, not a map of class ids"):
        sample(job_config(source=semantic, out_dir=tmp_path / "out3", maps=maps, num_per_prompt=1))
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def _guide_files(folder: Path, colours, size: int = 8) -> Path:
    folder.mkdir()
    for k, colour in enumerate(colours):
        Image.new("RGB", (size, size), colour).save(folder / f"{k}.png")
    return folder


def _signed(pngs: dict) -> torch.Tensor:
    return torch.from_numpy(np.stack(list(pngs.values()))).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_image_guiding_pulls_an_unconditional_models_samples_to_their_targets(tmp_path):
    """App. C, Eq. 17 in jobs.sample: guide_images (one target per row of an unconditional model: 32 px samples
    downsampled x4 to 8 px targets, themselves the model's samples of other seeds, so reachable) bring the
    samples' low-pass closer to the targets than the same seeds unguided; samples.json records each target;
    the LPIPS guider runs from weight files."""
    uncond = save_ldm(tiny_bundle("demo-uncond"), tmp_path / "uncond")  # KL first stage (a VQ one quantises)
    common = {"source": uncond, "num_per_prompt": 1, "sampling.num_steps": 8}
    sample(job_config(out_dir=tmp_path / "ref", num_samples=2, seed=50, **common))
    references = _signed(read_pngs(tmp_path / "ref"))
    for folder, images in (("targets", downsample(references, 4)), ("targets32", references)):
        (tmp_path / folder).mkdir()
        for k, image in enumerate(images):
            write_png(tmp_path / folder / f"{k}.png", ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0))
    sample(job_config(out_dir=tmp_path / "plain", num_samples=2, **common))
    guide = {"guide_images": tmp_path / "targets", "sampling.image_guidance_scale": 2.0,
             "sampling.image_guidance_downsample": 4}
    sample(job_config(out_dir=tmp_path / "guided", **common, **guide))
    saved = _signed(read_pngs(tmp_path / "targets"))
    plain, guided = (downsample(_signed(read_pngs(tmp_path / name)), 4) for name in ("plain", "guided"))
    assert (guided - saved).square().mean() < 0.7 * (plain - saved).square().mean()
    record = json.loads((tmp_path / "guided" / "samples.json").read_text())
    assert [Path(s["guide_image"]).name for s in record["samples"]] == ["0.png", "1.png"]
    assert record["sampling"]["image_guidance_scale"] == 2.0
    vgg, heads = write_lpips_files(tmp_path / "lpips")
    sample(job_config(out_dir=tmp_path / "lpips_out", lpips_vgg_path=vgg, lpips_heads_path=heads, **common,
                      guide_images=tmp_path / "targets32", **{"sampling.image_guidance_loss": "lpips",
                                                              "sampling.image_guidance_scale": 2.0}))
    assert len(read_pngs(tmp_path / "lpips_out")) == 2


def test_image_guiding_bad_requests_fail_before_any_sample(tmp_path):
    uncond = save_ldm(tiny_bundle("debug-uncond"), tmp_path / "uncond")
    targets = _guide_files(tmp_path / "targets", [(230, 30, 30)], size=20)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"RGB targets of 16x16 px; give targets of that size"):  # 64 px / 4
        sample(job_config(source=uncond, out_dir=out, guide_images=targets, **{
            "sampling.image_guidance_scale": 1.0, "sampling.image_guidance_downsample": 4}))
    assert not out.exists()
    with pytest.raises(ValueError, match="image guiding needs both"):
        job_config(source=uncond, out_dir=out, guide_images=targets)
    with pytest.raises(ValueError, match="image guiding needs both"):
        job_config(source=uncond, out_dir=out, num_samples=2, **{"sampling.image_guidance_scale": 1.0})
    cin = save_ldm(tiny_bundle("debug-cin"), tmp_path / "cin")
    with pytest.raises(ValueError, match="1 guide_images for 2 conditions"):
        sample(job_config(source=cin, out_dir=out, class_ids="[1,2]", guide_images=targets,
                          **{"sampling.image_guidance_scale": 1.0}))
    with pytest.raises(ValueError, match=r"LPIPS compares images of at least 16 px, the guide targets are 8x8"):
        sample(job_config(source=save_ldm(tiny_bundle("demo-uncond"), tmp_path / "small"), out_dir=out,
                          guide_images=_guide_files(tmp_path / "eight", [(0, 0, 0)]), **{
                              "sampling.image_guidance_scale": 1.0, "sampling.image_guidance_downsample": 4,
                              "sampling.image_guidance_loss": "lpips"}))
    with pytest.raises(ValueError, match="lpips_vgg_path.*or set sampling.image_guidance_loss=l2"):
        sample(job_config(source=uncond, out_dir=out, guide_images=_guide_files(tmp_path / "64", [(0, 0, 0)], 64),
                          lpips_vgg_path=tmp_path / "none.pth",
                          **{"sampling.image_guidance_scale": 1.0, "sampling.image_guidance_loss": "lpips"}))
