"""The whole LDM training step of jobs.train against a plain diffusers + AdamW step, same run.

Ours: `jobs.train.loop.train_step` + EMA update, i.e. our latent-shard loader (reading real tar
shards, 1 worker), the DeepSpeed ZeRO-2 engine (1 rank), the text transformer trained jointly,
classifier-free guidance dropout, Eq. 2 loss, clipping, AdamW, EMA. Peer: diffusers'
`UNet2DConditionModel` with the same UNet configuration (parameter counts checked equal) plus the
same text transformer (diffusers has none of its own), plain torch AdamW, the batch already in
memory. Both alternate rounds in one process. Prints one JSON line: img/s of both, ratio ours/peer
(>= 1.0: ours as fast), and MFU against a measured matmul peak (FLOPs per image counted once).

    python bench/train_step.py                           # CPU: debug-t2i preset, fp32
    python bench/train_step.py --gpu                     # 1.45B preset (UNet + text transformer), bf16
    python bench/train_step.py --gpu --unet-only         # the UNet alone (text encoder frozen, both)
    python bench/train_step.py --gpu --compile           # both under torch.compile
    python bench/train_step.py --ranks 2                 # ours on 2 gloo ranks against torch DDP + AdamW on 2
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import img_per_s, matmul_peak

from jobs.checkpointing import CheckpointConfig
from jobs.distributed import cleanup, free_port
from jobs.metrics import LoggerConfig
from jobs.train.config import ModelConfig, OptimConfig, TrainConfig, TrainerConfig
from jobs.train.loop import setup, train_step
from jobs.train.setup import train_flops_per_image
from ldm.diffusion.attention import heads_and_dim
from ldm.presets import PRESETS, build_conditioner
from pipeline.latents.loader import LatentDataConfig
from pipeline.shards import write_shard


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_random_latents(folder: Path, preset_name: str, num_samples: int) -> Path:
    """Random KL moments and token ids in the formats.md layout, 2 shards."""
    preset, rng = PRESETS[preset_name], np.random.default_rng(0)
    folder.mkdir(parents=True)
    channels, size, length = preset.unet.out_channels, preset.latent_size, preset.conditioner.text.max_length
    for shard in range(2):
        samples = [{"__key__": f"{shard}_{i:06d}", "txt": b"a caption", "json": b"{}",
                    "latent.npy": npy_bytes(rng.standard_normal((2 * channels, size, size)).astype(np.float16)),
                    "tokens.npy": npy_bytes(rng.integers(1, 1000, length).astype(np.int32))}
                   for i in range(num_samples // 2)]
        write_shard(folder / f"{shard:05d}.tar", samples)
    manifest = {"format": "ldm-pipeline/latents", "schema_version": 1, "storage": "moments",
                "encoder": {"kind": "kl", "config": {}, "sha256": "bench", "source": "bench"},
                "resolution": 8 * size, "crop": "center", "dtype": "float16", "latent_shape": [channels, size, size],
                "scale_factor": 0.18215, "scale_factor_source": "config", "num_samples": num_samples // 2 * 2,
                "shards": [{"name": f"{s:05d}.tar", "count": num_samples // 2, "sha256": "", "source": ""}
                           for s in range(2)], "skipped": {},
                "tokenizer": {"kind": "bench", "name_or_path": None, "max_length": length}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def diffusers_peer(cfg, sample_size: int):
    """diffusers' UNet2DConditionModel with the blocks of our UNetConfig (heads per level as ours)."""
    from diffusers import UNet2DConditionModel

    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2 ** i in cfg.attention_ds for i in range(len(widths))]
    heads = tuple(heads_and_dim(w, cfg.num_heads, cfg.num_head_channels)[0] for w in widths)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(widths), layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=heads,  # diffusers' name for the number of heads in SD-1 UNets
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        transformer_layers_per_block=cfg.transformer_depth)


def our_config(args, latent_dir: Path, run_dir: Path) -> TrainConfig:
    return TrainConfig(
        run_dir=str(run_dir), model=ModelConfig(preset=args.preset, train_text_encoder=not args.unet_only),
        trainer=TrainerConfig(zero_stage=args.zero_stage, precision=args.precision, max_steps=10**6, compile=args.compile,
                              compile_backend=args.compile_backend,
                              device="cuda" if args.gpu else "cpu"),
        optim=OptimConfig(lr=1e-4), logger=LoggerConfig(mode="disabled", progress_bar=False),
        data=LatentDataConfig(path=str(latent_dir), batch_size=args.batch, num_workers=1, use_tokens=True,
                              pin_memory=args.gpu),
        checkpoint=CheckpointConfig(resume="never"))


def our_step(job):
    def step():
        train_step(job)
        job.ema.update()
    return step


def peer_step(args, device: torch.device, batch: dict):
    """diffusers UNet (+ the same text transformer) with plain AdamW, on an in-memory batch; on several ranks
    both wrapped in torch DDP (the process group jobs.train's setup made)."""
    preset = PRESETS[args.preset]
    unet = diffusers_peer(preset.unet, preset.latent_size).to(device)
    text = build_conditioner(preset.conditioner).to(device).requires_grad_(not args.unet_only)
    if args.compile:
        unet = torch.compile(unet, backend=args.compile_backend)
    params = [p for m in (unet, text) for p in m.parameters() if p.requires_grad]
    if args.ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        unet = DistributedDataParallel(unet)
        text = DistributedDataParallel(text) if not args.unet_only else text
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    z_0, tokens = batch["z"].to(device), batch["tokens"].to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            t_B = torch.randint(0, 1000, (len(z_0),), device=device)
            eps = torch.randn_like(z_0)
            context = text(tokens)
            out = unet(z_0 + eps, t_B, encoder_hidden_states=context, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out.float(), eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in unet.parameters())


def peak_memory(args, job, device: torch.device, num_steps: int) -> dict:
    """Our step alone, `num_steps` times after one warm-up: the peak memory it reached."""
    step = our_step(job)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(num_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        import resource

        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"
    params = sum(getattr(p, "ds_numel", p.numel()) for p in job.engine.module.parameters() if p.requires_grad)
    return {"bench": "train_step_memory", "device": torch.cuda.get_device_name() if args.gpu else "cpu",
            "preset": args.preset, "zero_stage": args.zero_stage, "batch": args.batch, "precision": args.precision,
            "trainable_params": params, "peak_memory_gib": round(peak / 2**30, 3), "measure": kind}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="1.45B preset on CUDA, bf16")
    ap.add_argument("--unet-only", action="store_true", help="text encoder frozen in both")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile's backend for both (eager: trace only, as bench/gpu.sh --smoke uses on CPU)")
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--memory-only", action="store_true",
                    help="ours alone for --steps steps: peak memory (CUDA allocated, or the process's peak RSS on CPU)")
    ap.add_argument("--ranks", type=int, default=1,
                    help="2: ours on 2 gloo (or NCCL) ranks against torch DDP + AdamW on 2 ranks, same model; img/s of "
                         "the global batch")
    args = ap.parse_args()
    if args.ranks > 1 and "LOCAL_RANK" not in os.environ:  # start the ranks: this script again under torchrun
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
                   f"--master_port={free_port()}", sys.argv[0], *sys.argv[1:]]
        raise SystemExit(subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)
    args.preset = "ldm-kl8-t2i-1.45b" if args.gpu else "debug-t2i"
    args.precision = "bf16" if args.gpu else "fp32"
    args.batch = args.batch or (64 if args.gpu else 16)
    num_steps = args.steps or (10 if args.gpu else 5)
    if args.ranks == 1:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())})
    with tempfile.TemporaryDirectory() as tmp:
        latent_dir = write_random_latents(Path(tmp) / "latents", args.preset, 8 * args.batch)
        job = setup(our_config(args, latent_dir, Path(tmp) / "run"))
        device = job.dist.device
        if args.memory_only:
            print(json.dumps(peak_memory(args, job, device, num_steps)))
            return
        steps = {"ours": our_step(job)}
        steps["peer"], peer_unet_params = peer_step(args, device, next(iter(job.loader)))
        job.batches = iter(job.loader)  # the peek above superseded the job's iterator
        ours_unet_params = sum(p.numel() for p in job.engine.module.unet.parameters())
        if ours_unet_params != peer_unet_params:
            raise SystemExit(f"UNet configs differ: ours {ours_unet_params}, peer {peer_unet_params}")
        img_s = img_per_s(steps, args.batch * args.ranks, num_steps, args.rounds, device)
        is_main = job.dist.is_main
        cleanup()
    if not is_main:
        return
    flops = train_flops_per_image(args.preset, not args.unet_only)
    peak = matmul_peak(device, torch.bfloat16 if args.gpu else torch.float32, 8192 if args.gpu else 1024)
    print(json.dumps({
        "bench": "train_step", "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "preset": args.preset, "text_encoder": "frozen" if args.unet_only else "joint", "zero_stage": args.zero_stage,
        "ranks": args.ranks, "peer": "torch DDP + AdamW" if args.ranks > 1 else "plain AdamW",
        "batch": args.batch, "precision": args.precision, "compiled": args.compile,
        "compile_backend": args.compile_backend if args.compile else None,
        "ours_img_s": round(img_s["ours"], 2), "peer_img_s": round(img_s["peer"], 2),
        "ratio": round(img_s["ours"] / img_s["peer"], 3), "train_flops_per_image": flops,
        "matmul_peak_tflops": round(peak / 1e12, 3), "ours_mfu": round(img_s["ours"] / args.ranks * flops / peak, 4),
        "peer_mfu": round(img_s["peer"] / args.ranks * flops / peak, 4)}))


if __name__ == "__main__":
    main()
