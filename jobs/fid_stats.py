"""`python -m jobs.fid_stats reference=DIR out=refs/x.stats`: Inception statistics of a reference set.

    python -m jobs.fid_stats reference=data/coco_val/images out=refs/coco256.stats resolution=256
    torchrun --nproc_per_node=8 -m jobs.fid_stats reference=data/images out=refs/laion.stats max_samples=50000

Every rank extracts the features of its slice of the sorted reference list (jobs/evaluate/fid.py); the
features are gathered in global index order, so the result does not depend on the number of
ranks; rank 0 writes the stats folder: `stats.safetensors` (mu, sigma, the 2048-d features for
KID and precision-recall, the logits for IS, the global indices) and `protocol.json` (feature
extractor and weights sha256, resize method, resolution, source, sample count).

A rerun with the same protocol reuses the folder; another protocol (other weights, resolution,
source files or max_samples) is refused unless overwrite=true.
"""
import time

import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from tqdm import tqdm

from jobs.config import hydra_main
from jobs.distributed import (
    DistInfo,
    all_gather_object,
    broadcast_object,
    cleanup,
    init_distributed,
    print0,
)
from jobs.evaluate.config import FidStatsConfig
from jobs.evaluate.fid import (
    PROTOCOL_KEYS,
    extract_features,
    in_index_order,
    iter_slice,
    mismatched_keys,
    open_source,
    read_protocol,
    resize_method,
    save_stats,
    statistics,
)
from jobs.evaluate.inception import (
    FEATURES_2048,
    LOGITS,
    InceptionConfig,
    find_inception_weights,
    load_inception,
)

CACHE_KEYS = (*PROTOCOL_KEYS, "source", "max_samples")


def load_extractor(cfg: InceptionConfig, dist_info: DistInfo) -> tuple[torch.nn.Module, dict]:
    """torch-fidelity's Inception on this rank's device. Rank 0 finds (or downloads) the weights
    first, so that ranks never download at once; its error, if any, is raised on every rank."""
    error = None
    if dist_info.is_main:
        try:
            find_inception_weights(cfg.weights_path, cfg.allow_download)
        except ValueError as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        raise ValueError(error)
    return load_inception(cfg.weights_path, allow_download=False, device=dist_info.device)


def gathered_features(extractor, images, batch_size: int, dist_info: DistInfo) -> dict[str, torch.Tensor]:
    """This rank's features, all ranks' gathered in global index order (on every rank)."""
    bar = tqdm(images, unit="img", desc="inception", disable=not dist_info.is_main, dynamic_ncols=True)
    part = extract_features(extractor, bar, batch_size, dist_info.device)
    bar.close()
    return in_index_order(all_gather_object(part))


def summed_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def reusable(cfg: FidStatsConfig, wanted: dict) -> dict | None:
    """The protocol of cfg.out when it can be reused; ValueError when it differs and overwrite is off."""
    found = read_protocol(cfg.out)
    if found is None:
        return None
    differing = mismatched_keys(found, wanted, CACHE_KEYS)
    if cfg.isc and not found.get("has_logits"):
        differing.append("has_logits")
    if not differing:
        return found
    if cfg.overwrite:
        return None
    details = "; ".join(f"{key}: {found.get(key)!r} there, {wanted.get(key, cfg.isc)!r} now" for key in differing)
    raise ValueError(f"out={cfg.out} holds statistics made another way ({details}): set overwrite=true to "
                     f"recompute them, or choose another out=")


def _write(cfg: FidStatsConfig, merged: dict, wanted: dict, skipped: dict, seconds: float) -> dict:
    tensors = {"index": merged["index"], FEATURES_2048: merged[FEATURES_2048], **statistics(merged[FEATURES_2048])}
    protocol = {**wanted, "num_samples": len(merged["index"]), "skipped": skipped, "has_logits": cfg.isc,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cfg.isc:
        tensors[LOGITS] = merged[LOGITS]
        protocol["reference_inception_score"] = isc_features_to_metric(merged[LOGITS])  # torch-fidelity defaults
    save_stats(cfg.out, tensors, protocol)
    return {"out": cfg.out, "cached": False, "num_samples": protocol["num_samples"], "skipped": skipped,
            "seconds": round(seconds, 2)}


def _fid_stats(cfg: FidStatsConfig, dist_info: DistInfo) -> dict | None:
    source = open_source(cfg.reference)
    extractor, identity = load_extractor(cfg.inception, dist_info)
    wanted = {**identity, "resize": resize_method(cfg.resolution), "resolution": cfg.resolution,
              "source": source.describe(), "max_samples": cfg.max_samples}
    found = reusable(cfg, wanted)
    if found is not None:
        print0(f"reusing {cfg.out}: same protocol, {found['num_samples']} images")
        return {"out": cfg.out, "cached": True, "num_samples": found["num_samples"]} if dist_info.is_main else None
    start, errors = time.perf_counter(), {}
    images = iter_slice(source, dist_info.rank, dist_info.world_size, cfg.resolution, cfg.max_samples, errors)
    merged = gathered_features(extractor, images, cfg.inception.batch_size, dist_info)
    skipped = summed_counts(all_gather_object(errors))
    if not dist_info.is_main:
        return None
    return _write(cfg, merged, wanted, skipped, time.perf_counter() - start)


def fid_stats(cfg: FidStatsConfig) -> dict | None:
    """The job; returns its summary on rank 0 (None on the others)."""
    dist_info = init_distributed(device=cfg.device)
    try:
        return _fid_stats(cfg, dist_info)
    finally:
        cleanup()


main = hydra_main("fid_stats", FidStatsConfig, fid_stats)

if __name__ == "__main__":
    main()
