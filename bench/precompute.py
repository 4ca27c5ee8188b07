"""Precompute throughput: encode-only ours vs diffusers' AutoencoderKL (same config, same weights, same
run), and the stage end to end on Ray (image shards -> latent shards + manifest).

Encode-only times `encode_moments(x)` of our KL autoencoder against diffusers' `vae.encode(x)`
built from `diffusers_vae_config` of the same config with the converted weights, interleaved
rounds, median. End to end runs `pipeline.precompute.stage.precompute` on demo-scene JPEG shards, on a
Ray cluster started beforehand (its start is not measured; the encoder actors' start is).
Prints one JSON line; `encode_ratio` = ours / diffusers (target >= 1.0). The goal for the stage
is >= 1,000 img/s end to end per H100 at 256^2.

    python bench/precompute.py                    # CPU: kl-f8 layout at base_channels 32, 64^2, fp32
    python bench/precompute.py --gpu              # GPU: kl-f8 (Tab. 8), 256^2, bf16 autocast
"""
import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from jobs.demo.scenes import write_demo_dataset
from ldm.autoencoder.config import AUTOENCODER_PRESETS
from ldm.autoencoder.model import build_autoencoder
from ldm.convert.vae import autoencoder_to_diffusers, diffusers_vae_config
from pipeline.models.autoencoder import save_autoencoder
from pipeline.precompute.stage import PrecomputeConfig, precompute
from pipeline.ray_cluster import RayConfig, init_ray
from pipeline.shards import write_shard


def build_pair(cfg, device: torch.device):
    """Our autoencoder and diffusers' with the same weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ours = build_autoencoder(cfg).eval().requires_grad_(False)
    peer = AutoencoderKL.from_config(diffusers_vae_config(cfg)).eval().requires_grad_(False)
    peer.load_state_dict(autoencoder_to_diffusers(ours.state_dict(), cfg), strict=True)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return ours.to(device, memory_format=layout), peer.to(device, memory_format=layout)


def _timed(fn, x, reps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


@torch.inference_mode()
def encode_bench(cfg, args, device: torch.device) -> dict:
    ours, peer = build_pair(cfg, device)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1).contiguous(
        memory_format=layout)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    fns = {"ours": ours.encode_moments, "diffusers": lambda t: peer.encode(t).latent_dist.parameters}
    with torch.autocast(device.type, dtype=dtype, enabled=args.gpu):
        diff = (fns["ours"](x).float() - fns["diffusers"](x).float()).abs().max().item()
        for fn in fns.values():  # warm-up (cudnn autotuning, allocator)
            _timed(fn, x, 2, device)
        times = {name: [] for name in fns}
        for _ in range(args.rounds):  # interleaved, so load changes hit both alike
            for name, fn in fns.items():
                times[name].append(_timed(fn, x, args.reps, device))
    rate = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    return {"encode_img_per_s_ours": round(rate["ours"], 1), "encode_img_per_s_diffusers": round(rate["diffusers"], 1),
            "encode_ratio": round(rate["ours"] / rate["diffusers"], 3), "max_abs_diff": diff}


def write_image_shards(folder: Path, num_images: int, size: int, per_shard: int) -> None:
    """Demo-scene JPEGs in img2dataset layout; at most 512 distinct pictures, repeated under new keys."""
    www = folder / "www"
    write_demo_dataset(www, min(num_images, 512), seed=0, image_size=size)
    rows = pq.read_table(www / "urls.parquet").to_pylist()
    pictures = [((www / r["url"]).read_bytes(), r["caption"]) for r in rows]
    for shard in range(-(-num_images // per_shard)):
        samples = []
        for i in range(shard * per_shard, min(num_images, (shard + 1) * per_shard)):
            jpg, caption = pictures[i % len(pictures)]
            meta = {"key": f"{i:09d}", "caption": caption, "width": size, "height": size}
            samples.append({"__key__": f"{i:09d}", "jpg": jpg, "txt": caption.encode(),
                            "json": json.dumps(meta).encode()})
        write_shard(folder / "images" / f"{shard:05d}.tar", samples)


def end_to_end(cfg, args, tmp: Path) -> dict:
    torch.manual_seed(0)
    save_autoencoder(build_autoencoder(cfg), cfg, tmp / "ae")
    (tmp / "images").mkdir()
    write_image_shards(tmp, args.num_images, args.resolution, args.per_shard)
    rates = []
    for attempt in range(2):  # the second run finds warm task workers; both start their encoder actors
        run = PrecomputeConfig(input_dir=str(tmp / "images"), output_dir=str(tmp / f"out{attempt}"),
                               autoencoder=str(tmp / "ae"), resolution=args.resolution, batch_size=args.batch_size,
                               num_cpu_encoders=1, cpu_encoder_threads=max(1, (os.cpu_count() or 2) // 2),
                               scale_factor=0.18215)
        summary = precompute(run)
        assert summary["samples"] == args.num_images, summary
        rates.append(summary["samples_per_s"])
    return {"end_to_end_img_per_s": rates[0], "end_to_end_warm_img_per_s": rates[1],
            "bytes_per_sample": summary["bytes_per_sample"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="kl-f8 at 256^2, bf16 autocast, on CUDA")
    ap.add_argument("--num-images", type=int, default=None, help="end to end (default 256 CPU, 8192 GPU)")
    ap.add_argument("--per-shard", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-end-to-end", action="store_true")
    args = ap.parse_args()
    gpu_defaults, cpu_defaults = (256, 64, 8192, 1024), (64, 8, 256, 64)
    resolution, batch, num_images, per_shard = gpu_defaults if args.gpu else cpu_defaults
    args.resolution = resolution
    args.batch_size, args.num_images = args.batch_size or batch, args.num_images or num_images
    args.per_shard = args.per_shard or per_shard
    cfg = AUTOENCODER_PRESETS["kl-f8"]
    if not args.gpu:
        cfg = dataclasses.replace(cfg, base_channels=32, resolution=args.resolution)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        torch.backends.cudnn.benchmark = True
    result = {"bench": "precompute", "device": torch.cuda.get_device_name() if args.gpu else "cpu",
              "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "resolution": resolution,
              "batch_size": args.batch_size, "dtype": "bfloat16" if args.gpu else "float32",
              "config": "kl-f8" if args.gpu else "kl-f8 layout, base_channels 32"}
    result |= encode_bench(cfg, args, device)
    if not args.skip_end_to_end:
        init_ray(RayConfig(object_store_mb=2048 if args.gpu else 256))
        with tempfile.TemporaryDirectory() as tmp:
            result |= {"num_images": args.num_images} | end_to_end(cfg, args, Path(tmp))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
