"""Evaluation: reference statistics, FID / IS / KID / precision-recall, parity with torch-fidelity.

The Inception weights are made here: torch-fidelity's own network class, randomly initialised, its
batch-norm statistics set from one batch of real, grainy and noise images (so every feature is O(1):
see make_inception_weights), saved the way torch-fidelity loads them. The image sets are 40
demo scenes (reference, as PNG files and as tar shards of the same PNGs) and 40 other scenes with
added grain (the "generated" set).
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import (
    CONF,
    LAUNCHER_VARS,
    ROOT,
    inception_calibration,
    make_inception_weights,
    png_bytes,
    scene,
    tiny_bundle,
    write_lpips_files,
)
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file

import jobs.config
from jobs.distributed import DistInfo, free_port
from jobs.evaluate import sr
from jobs.evaluate.config import EvaluateConfig, FidStatsConfig
from jobs.evaluate.fid import PROTOCOL_FILE, STATS_FILE, extract_features, iter_slice, open_source
from jobs.evaluate.inception import (
    WEIGHTS_FILENAME,
    find_inception_weights,
    load_inception,
)
from jobs.evaluate.run import evaluate
from jobs.fid_stats import fid_stats
from ldm.image_metrics import psnr, ssim
from pipeline.conditions import condition_rng
from pipeline.conditions.degradations import degrade
from pipeline.models.bundle import load_ldm, save_ldm
from pipeline.shards import write_shard

NUM_IMAGES, SIZE = 40, 32
# our metric name -> torch-fidelity's key (we keep its names)
METRIC_KEYS = ("frechet_inception_distance", "inception_score_mean", "inception_score_std",
               "kernel_inception_distance_mean", "kernel_inception_distance_std", "precision", "recall")
jobs.config.register_schemas()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    sets = {"real": [scene(i, 0, grain=0) for i in range(NUM_IMAGES)],
            "fake": [scene(i, 1, grain=25) for i in range(NUM_IMAGES)]}
    for name, images in sets.items():
        (root / name).mkdir()
        for i, image in enumerate(images):
            (root / name / f"{i:04d}.png").write_bytes(png_bytes(image))
    (root / "shards").mkdir()
    for shard in range(2):  # the same PNGs as the real folder, 20 per shard
        samples = [{"__key__": f"{i:04d}", "png": png_bytes(sets["real"][i]), "txt": b"a scene"}
                   for i in range(shard * 20, shard * 20 + 20)]
        write_shard(root / "shards" / f"{shard:05d}.tar", samples)
    calibration = inception_calibration(sets["real"], sets["fake"])
    return {"root": root, "real": root / "real", "fake": root / "fake", "shards": root / "shards",
            "weights": make_inception_weights(root / WEIGHTS_FILENAME, calibration)}


def make_config(name: str, schema: type, overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return jobs.config.to_dataclass(compose(name, overrides=overrides), schema)


def stats_overrides(data: dict, reference: Path, out: Path, **extra) -> list[str]:
    values = {"reference": reference, "out": out, "inception.weights_path": data["weights"],
              "inception.allow_download": False, "inception.batch_size": 20} | extra
    return [f"{key}={value}" for key, value in values.items()]


def eval_overrides(data: dict, stats: Path, out_dir: Path, **extra) -> list[str]:
    values = {"reference_stats": stats, "out_dir": out_dir, "inception.weights_path": data["weights"],
              "inception.allow_download": False, "inception.batch_size": 20, "logger": "disabled",
              "metrics.kid_subsets": 20} | extra
    if "source" not in values:
        values.setdefault("images", data["fake"])
    return [f"{key}={value}" for key, value in values.items()]


def run_module(module: str, overrides: list[str], hydra_dir: Path, num_ranks: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_ranks}",
                f"--master_port={free_port()}", "-m"] if num_ranks > 1 else [sys.executable, "-m"]
    command = [*launcher, module, *overrides, f"hydra.run.dir={hydra_dir}", f"hydra.sweep.dir={hydra_dir}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torch_fidelity_metrics(**kwargs) -> dict:
    """torch_fidelity.calculate_metrics(**kwargs), in a process with one BLAS thread: its FID solves a
    2048 x 2048 eigenproblem, which on 2 busy cores takes 3x longer with two OpenBLAS threads."""
    script = ("import json, sys, torch_fidelity\n"
              "print(json.dumps(torch_fidelity.calculate_metrics(**json.loads(sys.argv[1]))))")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(kwargs)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_stats(data) -> Path:
    """Statistics of the first 8 reference images, computed in this process (one rank, no process group)."""
    out = data["root"] / "small.stats"
    summary = fid_stats(make_config("fid_stats", FidStatsConfig,
                                    stats_overrides(data, data["real"], out, max_samples=8)))
    assert summary["cached"] is False and summary["num_samples"] == 8
    return out


# ---------------------------------------------------------------------------------------------- parity


def batching_noise(data: dict, count: int = 12) -> dict[str, float]:
    """The largest feature difference this machine's CPU kernels make when only the batching and the
    thread count change, on `count` reference images: one batch at the default thread count against
    batches of 5 and 1 on one thread (a convolution's algorithm, hence its float32 rounding, depends
    on both). Inception's features differ across machines and batch splits by this much, never by
    what a changed pixel makes."""
    extractor, _ = load_inception(str(data["weights"]))
    images = list(iter_slice(open_source(data["real"]), 0, 1, max_samples=count))
    whole = extract_features(extractor, images, count)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = [extract_features(extractor, images, size) for size in (5, 1)]
    finally:
        torch.set_num_threads(threads)
    return {key: max((split[key] - whole[key]).abs().max().item() for split in splits)
            for key in ("2048", "logits_unbiased")}


@pytest.mark.slow
def test_two_ranks_equal_torch_fidelity(data, tmp_path):
    """fid_stats over the shards, then evaluate over the "generated" folder, each on 2 ranks (torchrun,
    gloo) == torch_fidelity.calculate_metrics on the two folders with the same weights (one process):
    the same reference features as torch-fidelity's own (its feature cache), the same metrics.
    (evaluate on 1 vs 2 ranks: the generation test below.)"""
    stats = tmp_path / "real.stats"
    run_module("jobs.fid_stats", stats_overrides(data, data["shards"], stats), tmp_path / "h1", 2)
    run_module("jobs.evaluate", eval_overrides(data, stats, tmp_path / "eval"), tmp_path / "h2", 2)
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    theirs = torch_fidelity_metrics(
        input1=str(data["fake"]), input2=str(data["real"]), fid=True, isc=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(data["weights"]),
        kid_subsets=20, kid_subset_size=NUM_IMAGES, cuda=False, save_cpu_ram=True, verbose=False,
        cache=True, cache_root=str(tmp_path / "fidelity_cache"), input2_cache_name="real")

    ours_stats = load_file(stats / STATS_FILE)
    assert torch.equal(ours_stats["index"], torch.arange(NUM_IMAGES))  # shards read in order, by 2 ranks
    floor = batching_noise(data)
    for key in ("2048", "logits_unbiased"):  # 2 ranks over shards == torch-fidelity over the PNG folder
        their_features = torch.load(tmp_path / "fidelity_cache" / f"real-inception-v3-compat-features-{key}.pt",
                                    weights_only=True)
        assert ours_stats[key].shape == their_features.shape
        error = (ours_stats[key] - their_features).abs().max().item()
        bound = 4 * floor[key] + 1e-5 * their_features.abs().max().item()
        assert error <= bound, f"{key}: features differ by {error:.3g}, float32 batching noise here is {floor[key]:.3g}"
    assert ours_stats["mu"].dtype == torch.float32 and ours_stats["sigma"].dtype == torch.float64  # as theirs
    assert theirs["frechet_inception_distance"] > 1.0  # the weights tell the sets apart: not a vacuous test
    assert theirs["inception_score_mean"] > 1.005  # 1.009 with these weights and images
    for key in METRIC_KEYS:  # the same features up to rounding; precision / recall count neighbours: 1 may flip
        tolerance = {"abs": 1 / NUM_IMAGES} if key in ("precision", "recall") else {"rel": 1e-3, "abs": 1e-5}
        assert ours["metrics"][key] == pytest.approx(theirs[key], **tolerance), key
    assert ours["num_samples"] == NUM_IMAGES and ours["protocol"]["kid_subset_size"] == NUM_IMAGES
    assert ours["protocol"]["weights_sha256"] == json.loads((stats / PROTOCOL_FILE).read_text())["weights_sha256"]


# ---------------------------------------------------------------------------------------------- weights


def test_missing_weights_name_both_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ValueError, match="inception.weights_path") as err:
        find_inception_weights(None, allow_download=False)
    assert WEIGHTS_FILENAME in str(err.value) and str(tmp_path / "torch_home") in str(err.value)
    with pytest.raises(ValueError, match="is not a file"):
        find_inception_weights(str(tmp_path / "nowhere.pth"))


def test_missing_weights_stop_the_job_before_any_work(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    overrides = stats_overrides(data, data["real"], tmp_path / "x.stats", **{"inception.weights_path": "null"})
    with pytest.raises(ValueError, match=WEIGHTS_FILENAME):
        fid_stats(make_config("fid_stats", FidStatsConfig, overrides))
    assert not (tmp_path / "x.stats").exists()


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["EVIL_MARKER"]),))


def test_weights_are_never_unpickled_beyond_tensors(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_inception(str(evil))
    assert not marker.exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="is not torch-fidelity's Inception"):
        load_inception(str(wrong))


# ---------------------------------------------------------------------------------------------- image sets


def test_slices_keep_global_indices_and_bad_images_lose_nothing(data, tmp_path):
    """Rank r of W gets indices r, r + W, ...; a corrupt file or an imageless sample is counted and
    skipped without shifting any other image's index; max_samples takes the first N."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes((data["real"] / f"{i:04d}.png").read_bytes())
    (folder / "2.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    source, errors = open_source(folder), {}
    assert source.kind == "images" and len(source.files) == 5
    assert [i for i, _ in iter_slice(source, 0, 2, errors=errors)] == [0, 4]  # index 2 was the corrupt one
    assert [(i, tuple(x.shape)) for i, x in iter_slice(source, 1, 2)] == [(1, (3, SIZE, SIZE)), (3, (3, SIZE, SIZE))]
    assert errors == {"corrupt_image": 1}
    assert [i for i, _ in iter_slice(source, 0, 1, max_samples=2)] == [0, 1]
    assert [tuple(x.shape) for _, x in iter_slice(source, 0, 1, resolution=24, max_samples=1)] == [(3, 24, 24)]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", [{"__key__": "a", "txt": b"no image"},
                                       {"__key__": "b", "png": (data["real"] / "0000.png").read_bytes()}])
    errors = {}
    assert [i for i, _ in iter_slice(open_source(shards), 0, 1, errors=errors)] == [0]
    assert errors == {"no_image": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.tar shards and no png/jpg/jpeg images"):
        open_source(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- cache


def test_stats_cache_is_reused_and_another_protocol_refused(data, tmp_path):
    out = tmp_path / "x.stats"
    run = lambda **extra: fid_stats(make_config("fid_stats", FidStatsConfig,  # noqa: E731
                                                stats_overrides(data, data["real"], out, **extra)))
    first = run(max_samples=4)
    assert (first["cached"], first["num_samples"], first["skipped"]) == (False, 4, {})
    written = (out / STATS_FILE).stat().st_mtime_ns
    assert run(max_samples=4)["cached"] is True
    assert (out / STATS_FILE).stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="max_samples: 4 there, 5 now.*overwrite=true"):
        run(max_samples=5)
    with pytest.raises(ValueError, match="resolution"):
        run(max_samples=4, resolution=24)
    assert run(max_samples=5, overwrite=True)["num_samples"] == 5
    protocol = json.loads((out / PROTOCOL_FILE).read_text())
    assert protocol["num_samples"] == 5 and protocol["source"] == open_source(data["real"]).describe()
    assert sorted(load_file(out / STATS_FILE)) == ["2048", "index", "logits_unbiased", "mu", "sigma"]
    assert not list(tmp_path.glob("x.stats.*"))  # no temp or old folder left behind


def test_evaluate_refuses_statistics_of_another_protocol(data, small_stats, tmp_path):
    overrides = eval_overrides(data, small_stats, tmp_path / "e", resolution=24)
    with pytest.raises(ValueError, match="resolution: None there, 24 here"):
        evaluate(make_config("evaluate", EvaluateConfig, overrides))


# ---------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("overrides, message", [
    (["source=z"], "set num_samples=N"),
    (["source=z", "images=w", "num_samples=10"], "exactly one of source"),
    (["source=z", "num_samples=4"], "metrics.isc_splits=10"),
    (["images=w", "prompt_file=p"], "drop prompt_file"),
    (["images=w", "metrics.fid=false", "metrics.isc=false", "metrics.kid=false", "metrics.prc=false"], "every metric"),
])
def test_bad_evaluate_config_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("evaluate", EvaluateConfig, ["reference_stats=x", *overrides])


def test_conditions_cycle_through_prompts_and_classes(tmp_path):
    from factories import tiny_bundle

    from jobs.evaluate.run import condition_rule

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    text = make_config("evaluate", EvaluateConfig, ["reference_stats=x", "out_dir=y", "source=z", "num_samples=10",
                                                    f"prompt_file={prompts}"])
    assert condition_rule(tiny_bundle("debug-t2i"), text)([4, 5]).prompts == ["a red circle", "a blue square"]
    classes = make_config("evaluate", EvaluateConfig, ["reference_stats=x", "out_dir=y", "source=z", "num_samples=10"])
    assert condition_rule(tiny_bundle("debug-cin"), classes)([3, 13]).class_ids == [3, 3]  # 10 classes, in turn
    with pytest.raises(ValueError, match="not text-conditional: drop prompt_file"):
        condition_rule(tiny_bundle("debug-cin"), text)
    with pytest.raises(ValueError, match="set prompt_file"):
        condition_rule(tiny_bundle("debug-t2i"), classes)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A class-conditional debug model (no tokenizer to build: cheaper per process than text)."""
    from factories import tiny_bundle

    from pipeline.models.bundle import save_ldm

    return save_ldm(tiny_bundle("debug-cin"), tmp_path_factory.mktemp("export") / "ldm")


@pytest.mark.slow
def test_guidance_sweep_is_one_multirun_and_ranks_do_not_change_it(data, small_stats, export, tmp_path):
    """`-m sampling.guidance_scale=1,3`: one folder per point, from one process and from 2 ranks under
    torchrun (whose points share one process group), with the same samples and metrics. FID is off
    here: its 2048 x 2048 eigenproblem is the slowest step on CPU, and the parity test covers it."""
    common = {"source": export, "num_samples": 4, "sampling.num_steps": 2, "metrics.isc_splits": 2,
              "metrics.fid": False, "save_images": True}
    overrides = [o for o in eval_overrides(data, small_stats, tmp_path, **common) if not o.startswith("out_dir")]
    sweeps = {ranks: tmp_path / f"sweep{ranks}" for ranks in (1, 2)}
    for ranks, folder in sweeps.items():
        run_module("jobs.evaluate", ["-m", "sampling.guidance_scale=1,3", *overrides], folder, ranks)
    points = {ranks: [json.loads((folder / str(n) / "metrics.json").read_text()) for n in (0, 1)]
              for ranks, folder in sweeps.items()}
    assert [p["sampling"]["guidance_scale"] for p in points[1]] == [1.0, 3.0]
    assert points[1][0]["metrics"] != points[1][1]["metrics"]
    assert points[1][0]["source"]["kind"] == "export" and points[1][0]["num_samples"] == 4
    assert "frechet_inception_distance" not in points[1][0]["metrics"]
    for n in (0, 1):
        assert points[2][n]["sampling"] == points[1][n]["sampling"]
        # The same samples up to a 1-level flip of a few pixels (below), and Inception batches of 2 vs 4:
        # features differ beyond float rounding, and KID's cubic kernel triples that (a CI run measured
        # 3e-4 relative). Another sample set moves every metric by far more (guidance 1 vs 3, above).
        for key in METRIC_KEYS[1:]:
            assert points[2][n]["metrics"][key] == pytest.approx(points[1][n]["metrics"][key], rel=2e-3,
                                                                  abs=1e-3), key
        for i in range(4):  # the same samples (a UNet batch of 2 vs 4 may flip a rounding: 1 level at most)
            two, one = (np.asarray(Image.open(sweeps[r] / str(n) / "samples" / f"{i:06d}.png"), dtype=np.int16)
                        for r in (2, 1))
            assert np.abs(two - one).max() <= 1 and (two != one).mean() < 1e-3


# ---------------------------------------------------------------------------------------------- super-resolution


def _hr_folder(folder: Path, count: int = 4, size: int = 64) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        grid = np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    return folder


def test_super_resolution_protocol_scores_against_the_hr_images_on_any_rank_split(data, small_stats, tmp_path):
    """Tab. 5: degrade each HR image, upsample it with the model, score PSNR / SSIM against the HR
    image (and the bicubic baseline) besides FID / IS; rank slices together give the one-rank scores."""
    source = save_ldm(tiny_bundle("debug-sr"), tmp_path / "sr")
    hr = _hr_folder(tmp_path / "hr")
    overrides = eval_overrides(data, small_stats, tmp_path / "eval", source=source, hr_images=hr,
                               degradation="bsr", save_images=True,
                               **{"sampling.num_steps": 2, "sampling.guidance_scale": 1.0,
                                  "metrics.isc_splits": 2, "metrics.prc": False})
    cfg = make_config("evaluate", EvaluateConfig, overrides)
    summary = evaluate(cfg)
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["num_samples"] == 4 and record["super_resolution"]["degradation"] == "bsr"
    assert {"frechet_inception_distance", "psnr", "psnr_std", "ssim", "bicubic_psnr", "bicubic_ssim"} <= set(summary)
    # The baseline row, computed here from the same seeded degradations
    up_psnr, up_ssim = [], []
    for i in range(4):
        image = np.asarray(Image.open(hr / f"{i:04d}.png").convert("RGB"))
        low = degrade(image, "bsr", condition_rng(cfg.seed, 0, i))
        saved_low = np.asarray(Image.open(tmp_path / "eval" / "low_res" / f"{i:06d}.png"))
        np.testing.assert_array_equal(saved_low, low)  # save_images: the model's very input
        assert Image.open(tmp_path / "eval" / "samples" / f"{i:06d}.png").size == (64, 64)
        up = np.asarray(Image.fromarray(low).resize((64, 64), Image.Resampling.BICUBIC))
        pair = [torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].float() / 127.5 - 1 for x in (up, image)]
        up_psnr.append(float(psnr(*pair)[0]))
        up_ssim.append(float(ssim(*pair)[0]))
    assert summary["bicubic_psnr"] == pytest.approx(np.mean(up_psnr), rel=1e-5)
    assert summary["bicubic_ssim"] == pytest.approx(np.mean(up_ssim), rel=1e-5)
    assert 0 < summary["psnr"] < 60 and -1 <= summary["ssim"] <= 1
    bundle = load_ldm(str(source), "ema", None)

    def slice_scores(rank: int, world_size: int) -> list:
        scores: list = []
        info = DistInfo(rank, world_size, 0, torch.device("cpu"), None)
        list(sr.sr_slice(bundle, cfg, info, scores))
        return scores
    split = sorted(slice_scores(0, 2) + slice_scores(1, 2))
    whole = sorted(slice_scores(0, 1))
    assert [i for i, _ in split] == [i for i, _ in whole] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(split, whole):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)  # the same sample per index, batched otherwise


def test_super_resolution_protocol_refuses_bad_input(data, small_stats, tmp_path):
    source = save_ldm(tiny_bundle("debug-sr"), tmp_path / "sr")
    with pytest.raises(ValueError, match="hr_images=FOLDER"):
        evaluate(make_config("evaluate", EvaluateConfig, eval_overrides(data, small_stats, tmp_path / "e",
                                                                        source=source, num_samples=4,
                                                                        **{"metrics.isc_splits": 2})))
    odd = _hr_folder(tmp_path / "odd", count=2, size=62)
    with pytest.raises(ValueError, match="62x62, not a multiple of 4"):
        evaluate(make_config("evaluate", EvaluateConfig, eval_overrides(
            data, small_stats, tmp_path / "e2", source=source, hr_images=odd, **{"metrics.isc_splits": 2})))
    with pytest.raises(ValueError, match="degradation='jpeg'"):
        make_config("evaluate", EvaluateConfig, ["reference_stats=x", "source=s", "hr_images=h", "degradation=jpeg"])


def test_super_resolution_guiding_row_guides_each_sample_to_its_own_low_res_input(data, small_stats, tmp_path,
                                                                                    monkeypatch):
    """Tab. 5's guiding rows: with sampling.image_guidance_scale > 0 the protocol hands each sample's low-res
    input to the sampler as its guide target (T = the x4 downsampling) and LPIPS when asked; without, none.
    Guiding elsewhere in jobs.evaluate, or another factor, is refused before any work."""
    source = save_ldm(tiny_bundle("debug-sr"), tmp_path / "sr")
    hr = _hr_folder(tmp_path / "hr")
    seen = []
    real_generate = sr.generate

    def spy(bundle, conditions, seeds, cfg, device, **kwargs):
        seen.append((conditions, cfg.image_guidance_scale, kwargs.get("lpips")))
        return real_generate(bundle, conditions, seeds, cfg, device, **kwargs)

    monkeypatch.setattr(sr, "generate", spy)
    vgg, heads = write_lpips_files(tmp_path / "lpips")
    guided = {"sampling.image_guidance_scale": 5.0, "sampling.image_guidance_downsample": 4,
              "sampling.image_guidance_loss": "lpips", "lpips_vgg_path": vgg, "lpips_heads_path": heads}
    for name, extra in (("plain", {}), ("guided", guided)):
        evaluate(make_config("evaluate", EvaluateConfig, eval_overrides(
            data, small_stats, tmp_path / name, source=source, hr_images=hr, save_images=True,
            **{"sampling.num_steps": 2, "sampling.batch_size": 4, "metrics.isc_splits": 2, "metrics.prc": False},
            **extra)))
    (plain, plain_scale, plain_lpips), (conditions, scale, lpips) = seen
    assert plain.guide_targets is None and plain_scale == 0 and plain_lpips is None
    assert scale == 5.0 and lpips is not None
    torch.testing.assert_close(conditions.guide_targets, conditions.images)  # its own low-res input
    low = np.stack([np.asarray(Image.open(tmp_path / "guided" / "low_res" / f"{i:06d}.png")) for i in range(4)])
    torch.testing.assert_close(conditions.guide_targets, torch.from_numpy(low).permute(0, 3, 1, 2).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="guides only the super-resolution protocol"):
        make_config("evaluate", EvaluateConfig, ["reference_stats=x", "source=s", "num_samples=20",
                                                 "sampling.image_guidance_scale=1"])
    with pytest.raises(ValueError, match="sampling.image_guidance_downsample=4"):
        make_config("evaluate", EvaluateConfig, ["reference_stats=x", "source=s", "hr_images=h",
                                                 "sampling.image_guidance_scale=1"])


# ---------------------------------------------------------------------------------------------- inpainting


def _inpainting_set(root: Path, count: int = 8) -> tuple[Path, Path]:
    """`count` 32 px scenes and a mask per scene: the even ones cover 45 % (LaMa's 40-50 % bin:
    rows 0..13 and 4 of 32 columns of row 14, 464 of 1024 pixels), the odd ones 25 %."""
    images, masks = root / "truth", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(count):
        (images / f"{i:04d}.png").write_bytes(png_bytes(scene(i, 2, grain=0)))
        mask = np.zeros((SIZE, SIZE), np.uint8)
        if i % 2 == 0:
            mask[:14] = 255
            mask[14, :16] = 255
        else:
            mask[8:24, 8:24] = 255
        Image.fromarray(mask).save(masks / f"{i:04d}.png")
    return images, masks


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory) -> dict[str, Path]:
    from factories import write_lpips_files

    root = tmp_path_factory.mktemp("inpainting")
    vgg, heads = write_lpips_files(root / "lpips")
    images, masks = _inpainting_set(root)
    return {"source": save_ldm(tiny_bundle("debug-inpainting"), root / "ldm"), "vgg": vgg, "heads": heads,
            "images": images, "masks": masks}


def inpainting_overrides(data: dict, model: dict, out_dir: Path, **extra) -> list[str]:
    values = {"source": model["source"], "inpaint_images": model["images"], "lpips_vgg_path": model["vgg"],
              "lpips_heads_path": model["heads"], "sampling.num_steps": 2, "metrics.isc_splits": 2,
              "metrics.prc": False} | extra
    return [o for o in eval_overrides(data, None, out_dir, **values) if not o.startswith("reference_stats=")]


def test_inpainting_protocol_scores_composites_against_their_originals(data, inpainting_model, tmp_path):
    """Tab. 7 as LaMa's evaluator does it: FID of the composites against their own originals, over all
    images and over the 40-50 % bin, and LPIPS of each composite against its original."""
    from pipeline.models.weights import load_lpips

    m = inpainting_model
    out = tmp_path / "eval"
    summary = evaluate(make_config("evaluate", EvaluateConfig, inpainting_overrides(
        data, m, out, masks=m["masks"], save_images=True)))
    record = json.loads((out / "metrics.json").read_text())
    assert record["inpainting"]["masks"] == str(m["masks"].resolve()) and summary["num_samples"] == 8
    assert summary["num_samples_40_50"] == 4 and summary["mean_hole_fraction"] == pytest.approx((464 + 256) / 2048)
    # The output is composited: outside the hole every pixel is the original's.
    lpips = load_lpips(str(m["vgg"]), str(m["heads"]))
    distances = []
    for i in range(8):
        truth = np.asarray(Image.open(m["images"] / f"{i:04d}.png").convert("RGB"))
        filled = np.asarray(Image.open(out / "samples" / f"{i:06d}.png").convert("RGB"))
        hole = np.asarray(Image.open(m["masks"] / f"{i:04d}.png")) > 127
        np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / f"{i:06d}.png")) > 127, hole)
        np.testing.assert_array_equal(filled[~hole], truth[~hole])
        assert (filled[hole] != truth[hole]).any()  # and the hole is the model's
        pair = [torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1 for x in (filled, truth)]
        distances.append(float(lpips(*pair)[0]))
    assert summary["lpips"] == pytest.approx(np.mean(distances), rel=1e-4)
    assert summary["lpips_40_50"] == pytest.approx(np.mean(distances[::2]), rel=1e-4)
    # FID against the originals: what evaluating the saved composites against the originals' statistics
    # gives, for all images and for the even (40-50 %) ones.
    for subset, key in ((range(8), "frechet_inception_distance"), (range(0, 8, 2), "frechet_inception_distance_40_50")):
        (tmp_path / key / "truth").mkdir(parents=True)
        (tmp_path / key / "filled").mkdir()
        for i in subset:
            (tmp_path / key / "truth" / f"{i:04d}.png").write_bytes((m["images"] / f"{i:04d}.png").read_bytes())
            (tmp_path / key / "filled" / f"{i:04d}.png").write_bytes((out / "samples" / f"{i:06d}.png").read_bytes())
        stats = tmp_path / key / "truth.stats"
        fid_stats(make_config("fid_stats", FidStatsConfig, stats_overrides(data, tmp_path / key / "truth", stats)))
        plain = evaluate(make_config("evaluate", EvaluateConfig, eval_overrides(
            data, stats, tmp_path / key / "eval", images=tmp_path / key / "filled",
            **{"metrics.isc_splits": 2, "metrics.prc": False})))
        assert summary[key] == pytest.approx(plain["frechet_inception_distance"], rel=1e-3), key


def test_inpainting_masks_are_lamas_eval_masks_and_ranks_do_not_change_the_scores(data, inpainting_model, tmp_path):
    from jobs.evaluate import inpainting
    from pipeline.conditions.masks import eval_mask

    m = inpainting_model
    cfg = make_config("evaluate", EvaluateConfig, inpainting_overrides(
        data, m, tmp_path / "eval", mask_setting="train-32", lpips=False, save_images=True))
    summary = evaluate(cfg)
    assert "lpips" not in summary and "frechet_inception_distance" in summary
    for i in range(8):
        drawn = eval_mask("train-32", SIZE, SIZE, condition_rng(cfg.seed, 0, i))
        assert drawn.mean() <= 0.5
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "eval" / "masks" / f"{i:06d}.png")) > 127,
                                      drawn.astype(bool))
    bundle = load_ldm(str(m["source"]), "ema", None)

    def slice_scores(rank: int, world_size: int) -> list:
        scores: list = []
        info = DistInfo(rank, world_size, 0, torch.device("cpu"), None)
        features = [(i, x.float().mean().item()) for i, x in inpainting.inpainting_slice(bundle, cfg, info, None,
                                                                                           scores)]
        return sorted((i, s["hole_fraction"], s["bin"], f) for (i, s), (_, f) in zip(sorted(scores), sorted(features)))
    split = sorted(slice_scores(0, 2) + slice_scores(1, 2))
    whole = slice_scores(0, 1)
    assert [row[:3] for row in split] == [row[:3] for row in whole]
    assert [row[3] for row in split] == pytest.approx([row[3] for row in whole], abs=0.5)  # mean uint8 value


def test_inpainting_protocol_refuses_bad_input(data, inpainting_model, tmp_path):
    m = inpainting_model
    small = tmp_path / "small_masks"
    small.mkdir()
    for i in range(8):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(small / f"{i:04d}.png")
    with pytest.raises(ValueError, match=r"0000.png is 16x16 but its image 0000.png is 32x32"):
        evaluate(make_config("evaluate", EvaluateConfig, inpainting_overrides(data, m, tmp_path / "e", masks=small)))
    with pytest.raises(ValueError, match="lpips_vgg_path=.*or set lpips=false"):
        evaluate(make_config("evaluate", EvaluateConfig, inpainting_overrides(
            data, m, tmp_path / "e2", lpips_vgg_path=tmp_path / "missing.pth")))
    assert not (tmp_path / "e2").exists()  # refused before any sample
    for overrides, message in [(["reference_stats=x"], "drop reference_stats"),
                               (["hr_images=h"], "two protocols"),
                               (["mask_setting=wide"], "mask_setting='wide'")]:
        with pytest.raises(ValueError, match=message):
            make_config("evaluate", EvaluateConfig, ["source=s", "inpaint_images=i", *overrides])
    with pytest.raises(ValueError, match="set reference_stats=FOLDER"):
        make_config("evaluate", EvaluateConfig, ["source=s", "num_samples=20"])


# ---------------------------------------------------------------------------------------------- semantic


def test_semantic_models_are_evaluated_from_their_maps(data, small_stats, tmp_path):
    """Sample i is drawn from map i % count with seed + i: the very image jobs.sample makes from that map."""
    from jobs.sample.config import SampleConfig
    from jobs.sample.run import sample

    source = save_ldm(tiny_bundle("debug-semantic"), tmp_path / "semantic")
    maps = tmp_path / "maps"
    maps.mkdir()
    for i in range(2):
        ids = np.zeros((64, 64), np.uint8)
        ids[:, 32 * i:] = 3
        Image.fromarray(ids).save(maps / f"{i:04d}.png")
    steps = {"sampling.num_steps": 2, "sampling.guidance_scale": 1.0}
    with pytest.raises(ValueError, match="semantic-synthesis model: set maps=FOLDER"):
        evaluate(make_config("evaluate", EvaluateConfig, eval_overrides(
            data, small_stats, tmp_path / "e", source=source, num_samples=4, **steps, **{"metrics.isc_splits": 2})))
    summary = evaluate(make_config("evaluate", EvaluateConfig, eval_overrides(
        data, small_stats, tmp_path / "eval", source=source, maps=maps, num_samples=4, save_images=True, seed=5,
        **steps, **{"metrics.isc_splits": 2, "metrics.prc": False})))
    assert summary["num_samples"] == 4 and "frechet_inception_distance" in summary
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["maps"] == str(maps.resolve())
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = jobs.config.to_dataclass(compose("sample", overrides=[
            f"source={source}", f"out_dir={tmp_path / 'sampled'}", f"maps={maps}", "num_per_prompt=1", "seed=7",
            "sampling.num_steps=2", "progress_bar=false"]), SampleConfig)
    sample(cfg)  # map 1 with seed 7 + 1 = evaluation sample 3 (map 3 % 2 = 1, seed 5 + 3)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "eval" / "samples" / "000003.png")),
                                  np.asarray(Image.open(tmp_path / "sampled" / "000001.png")))
    with pytest.raises(ValueError, match="not a semantic-synthesis model: drop maps"):
        evaluate(make_config("evaluate", EvaluateConfig, eval_overrides(
            data, small_stats, tmp_path / "e3", source=save_ldm(tiny_bundle("debug-cin"), tmp_path / "cin"),
            maps=maps, num_samples=4, **steps, **{"metrics.isc_splits": 2})))
