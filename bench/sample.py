"""Sampling throughput: our DDIM loop with classifier-free guidance against diffusers' DDIMScheduler
driving diffusers' UNet2DConditionModel, with the same weights, in the same run.

Ours: `jobs.sample.generate.generate(..., output="latents")`: tokenisation, tau_theta, per-sample
seeded z_T, DDIM (ldm.diffusion.samplers) with guidance in one batched call per step (ldm.diffusion.guidance).
Peer: the loop a diffusers pipeline runs: the same tokeniser and tau_theta (diffusers has no
counterpart of the paper's jointly trained text transformer), the same z_T, `DDIMScheduler` set up
by ldm.convert.diffusers.diffusers_scheduler_config, and `UNet2DConditionModel` holding our UNet's weights
(ldm.convert.diffusers.unet_to_diffusers), cond and uncond in one batched call per step. Same batch, steps,
guidance scale and precision (bf16: autocast around both); first-stage decoding is left out of both.
Rounds alternate so that drift of a shared machine hits both alike. Prints one JSON line: samples/s
of both, the ratio ours / peer (>= 1.0: ours as fast), and the largest latent difference between the
two (the same maths; exact up to float rounding in fp32).

    python bench/sample.py                  # CPU: debug-t2i, 16x16 latents, batch 4, 50 steps, fp32
    python bench/sample.py --gpu            # ldm-kl8-t2i-1.45b, 256^2 (32x32 latents), batch 32, 50 steps, bf16
"""
import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from jobs.sample.conditions import Conditions
from jobs.sample.generate import (
    SamplingConfig,
    generate,
    initial_noise,
    sample_generators,
)
from ldm.convert.diffusers import diffusers_scheduler_config
from ldm.convert.unet import diffusers_unet_config, unet_to_diffusers
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.tokenizers import build_tokenizer
from ldm.diffusion.unet import UNet
from ldm.presets import PRESETS, build_conditioner
from pipeline.models.bundle import LDMBundle

WORDS = "a photo of cat red blue green circle square triangle in the top left small big".split()
PROMPTS = ["a red circle in the top left", "a big blue square", "a photo of a cat", "a small green triangle"]


def bert_vocab(folder: Path) -> Path:
    """A tiny WordPiece vocabulary with BERT's special ids ([CLS] 101, [SEP] 102): works offline and
    stands in for bert-base-uncased, whose ids only matter to trained weights."""
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + WORDS) + "\n")
    return folder


def random_bundle(preset_name: str, device: torch.device, vocab: Path) -> LDMBundle:
    """Random weights moved off their init (zero-initialised output layers would make eps = 0)."""
    preset = PRESETS[preset_name]
    torch.manual_seed(0)
    with device:
        unet, conditioner = UNet(preset.unet), build_conditioner(preset.conditioner)
    with torch.no_grad():
        for p in [*unet.parameters(), *conditioner.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    tokenizer = {"kind": "bert", "name_or_path": str(vocab), "max_length": preset.conditioner.text.max_length}
    return LDMBundle(preset_name, preset, unet.eval().requires_grad_(False), conditioner.eval().requires_grad_(False),
                     None, 1.0, tokenizer, NoiseSchedule.from_config(preset.schedule), preset.objective,
                     (preset.unet.out_channels, preset.latent_size, preset.latent_size),
                     {"kind": "bench", "path": None, "step": 0, "weights": "random"})


def diffusers_unet(bundle: LDMBundle, device: torch.device):
    from diffusers import UNet2DConditionModel

    cfg = bundle.unet.cfg
    peer = UNet2DConditionModel.from_config(diffusers_unet_config(cfg, bundle.latent_shape[1]))
    peer.load_state_dict(unet_to_diffusers(bundle.unet.state_dict(), cfg))
    return peer.to(device).eval().requires_grad_(False)


def ours(bundle, cfg: SamplingConfig, prompts: list[str], seeds: list[int], device) -> torch.Tensor:
    return generate(bundle, Conditions(prompts=prompts), seeds, cfg, device, output="latents")


@torch.no_grad()
def peer(bundle, tokenizer, unet, scheduler, cfg: SamplingConfig, prompts: list[str], seeds: list[int],
         device) -> torch.Tensor:
    conditioner = bundle.conditioner
    tokens = tokenizer(prompts).to(device)
    z = initial_noise(sample_generators(seeds), bundle.latent_shape).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    with autocast:
        context = torch.cat([conditioner(tokens), conditioner(conditioner.null_condition(len(prompts)))])
        scheduler.set_timesteps(cfg.num_steps)
        for t in scheduler.timesteps:
            out_c, out_u = unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.float().chunk(2)
            z = scheduler.step(out_u + cfg.guidance_scale * (out_c - out_u), t, z, eta=0.0).prev_sample
    return z.float().cpu()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()  # both return CPU tensors: the device is synchronised
    return time.perf_counter() - start, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the 1.45B text-to-image preset on CUDA, bf16")
    ap.add_argument("--batch", type=int, default=None, help="samples per batch (default 4 CPU, 32 GPU)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads: 1 by default, because on a shared 2-core machine two threads "
                         "stalled each other (10-15x slower, both sides alike)")
    args = ap.parse_args()
    if not args.gpu:
        torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler

    device = torch.device("cuda" if args.gpu else "cpu")
    preset_name = "ldm-kl8-t2i-1.45b" if args.gpu else "debug-t2i"
    batch = args.batch or (32 if args.gpu else 4)
    cfg = SamplingConfig(num_steps=args.steps, guidance_scale=args.guidance_scale, batch_size=batch,
                         precision="bf16" if args.gpu else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = random_bundle(preset_name, device, bert_vocab(Path(tmp)))
        unet = diffusers_unet(bundle, device)
        spec = bundle.tokenizer
        tokenizer = build_tokenizer(spec["kind"], spec["name_or_path"], spec["max_length"])  # ours caches its own
        scheduler = DDIMScheduler.from_config(diffusers_scheduler_config(PRESETS[preset_name].schedule))
        prompts, seeds = [PROMPTS[i % len(PROMPTS)] for i in range(batch)], list(range(batch))
        runs = {"ours": lambda: ours(bundle, cfg, prompts, seeds, device),
                "peer": lambda: peer(bundle, tokenizer, unet, scheduler, cfg, prompts, seeds, device)}
        outputs = {name: run() for name, run in runs.items()}  # warm-up (and kernels, caches, tokenisers)
        seconds = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                elapsed, outputs[name] = timed(run)
                seconds[name].append(elapsed)
    rate = {name: batch / statistics.median(s) for name, s in seconds.items()}
    print(json.dumps({
        "bench": "sample", "device": torch.cuda.get_device_name() if args.gpu else "cpu", "preset": preset_name,
        "latent": list(bundle.latent_shape), "batch": batch, "steps": args.steps, "sampler": "ddim",
        "guidance_scale": args.guidance_scale, "precision": cfg.precision, "threads": torch.get_num_threads(),
        "ours_samples_s": round(rate["ours"], 3), "peer_samples_s": round(rate["peer"], 3),
        "ratio": round(rate["ours"] / rate["peer"], 3),
        "max_latent_diff": float((outputs["ours"] - outputs["peer"]).abs().max()),
        "seconds": {name: [round(s, 3) for s in v] for name, v in seconds.items()}}))


if __name__ == "__main__":
    main()
