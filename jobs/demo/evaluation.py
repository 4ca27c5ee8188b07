"""The demo's evaluation stages: FID / KID with `jobs.fid_stats` + `jobs.evaluate`, and caption adherence.

FID and KID (torch-fidelity's maths through jobs.evaluate.fid) compare the guided and unguided samples with
the held-out demo images. They need torch-fidelity's Inception-v3 weights; when they are not on the
machine (no network here, and the demo never downloads), the demo makes a STAND-IN: the same network
(torch-fidelity's inception-v3-compat), randomly initialised with a fixed seed, its batch-norm
statistics set from held-out images (else a random 50-layer net's features shrink towards 0 and every
distance with them). Its distances rank sample sets sensibly but are not comparable to any published
FID; the report and the JSON say which extractor was used.

Caption adherence (jobs.demo.adherence): the share of samples whose detected shape, colour, position and
size all match their caption, per variant, with each attribute's share and the chance levels.
"""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from jobs.demo.adherence import ATTRIBUTES, adherence
from jobs.demo.commands import NUM_RANKS, SAMPLE_VARIANTS, check_samples, run_job
from jobs.demo.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Scene
from jobs.evaluate.inception import FEATURE_EXTRACTOR, find_inception_weights

FID_VARIANTS = ("guided", "unguided")
CHANCE = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "position": 1 / len(POSITIONS),
          "size": 1 / len(SIZES)}
CHANCE["colour_position"] = CHANCE["colour"] * CHANCE["position"]
CHANCE["all"] = float(np.prod([CHANCE[a] for a in ATTRIBUTES]))
STANDIN_SEED = 0


class _UnloadedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's network keeping its random initialisation (its weight loading is skipped)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def standin_inception(path: Path, calibration_N3HW: torch.Tensor) -> Path:
    """Write a random-weight inception-v3-compat whose batch-norm statistics are those of
    `calibration_N3HW` (uint8 images), in the file layout torch-fidelity loads."""
    nothing = io.BytesIO()
    torch.save({}, nothing)
    nothing.seek(0)
    with torch.random.fork_rng():
        torch.manual_seed(STANDIN_SEED)
        net = _UnloadedInception(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=nothing)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    net.train()
    with torch.no_grad():
        net(calibration_N3HW)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return path


def feature_extractor(s, reference_dir: Path, folder: Path) -> dict:
    """The Inception weights to use (a stand-in is written to `folder`) and how the report names them."""
    try:
        path = find_inception_weights(None, allow_download=False)
        return {"weights_path": str(path), "comparable": True,
                "extractor": "Inception-v3 (torch-fidelity inception-v3-compat, the FID weights)"}
    except ValueError:
        pass
    files = sorted(reference_dir.glob("*.jpg"))[:s.num_calibration]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    path = standin_inception(folder / "standin-inception.pth",
                             torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    return {"weights_path": str(path), "comparable": False,
            "extractor": f"stand-in: torch-fidelity inception-v3-compat with random weights (seed {STANDIN_SEED}), "
                         f"batch-norm statistics of {len(files)} held-out images; torch-fidelity's Inception "
                         "weights were not found (see jobs/evaluate/inception.py)"}


def reference_stats(s, reference_dir: Path, folder: Path, stage: str, log_path: Path) -> tuple[dict, dict, Path]:
    """(extractor, the jobs' inception overrides, stats folder): `jobs.fid_stats` of the held-out images
    into `folder`, with the FID Inception when it is on the machine, else the stand-in."""
    extractor = feature_extractor(s, reference_dir, folder)
    inception = {"inception.weights_path": extractor["weights_path"], "inception.allow_download": False,
                 "inception.batch_size": 48, "device": "cpu"}
    stats = folder / "reference.stats"
    run_job(stage, "fid_stats", {"reference": reference_dir, "out": stats, "isc": False, "overwrite": True,
                                 **inception}, s, log_path, NUM_RANKS)
    return extractor, inception, stats


def fid_kid(s, reference_dir: Path, log_path: Path) -> dict:
    """Reference statistics of the held-out images, then FID / KID of each variant's samples."""
    extractor, inception, stats = reference_stats(s, reference_dir, s.out / "eval", "fid_reference", log_path)
    result = {**extractor, "reference": str(reference_dir), "num_reference": s.num_held_out}
    for variant in FID_VARIANTS:
        out = run_job(f"fid_{variant}", "evaluate", {
            "images": s.out / "samples" / variant, "num_samples": s.num_samples, "reference_stats": stats,
            "out_dir": s.out / "eval" / variant, "overwrite": True, "logger": "disabled",
            "metrics.isc": False, "metrics.prc": False, **inception}, s, log_path, NUM_RANKS)
        result[variant] = {"fid": out["frechet_inception_distance"],
                           "kid": out["kernel_inception_distance_mean"],
                           "kid_std": out["kernel_inception_distance_std"], "metrics_json": out["out_dir"]}
    return result


def caption_adherence(s, scenes: list[Scene], log_path: Path) -> dict:
    """jobs.demo.adherence of every variant's samples against the captions they were drawn from
    (the unconditional samples against the same captions: the no-information baseline)."""
    result = {}
    for variant in SAMPLE_VARIANTS:
        files = check_samples(s.out / "samples" / variant, len(scenes), "adherence", log_path)
        result[variant] = adherence([Image.open(f).convert("RGB") for f in files], scenes)
    result["chance"] = CHANCE
    with open(log_path, "a") as log:
        for variant, shares in result.items():
            log.write(f"{variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()) + "\n")
    return result
