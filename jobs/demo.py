"""The embedded demo: a tiny text-to-image LDM on synthetic captioned scenes, on CPU, in minutes.

Today it runs the stages that exist (issue 10 grows it into the whole pipeline):
1. generate the captioned demo dataset (pipeline.demo_scenes) and serve it on 127.0.0.1;
2. ingest it with img2dataset on a local Ray cluster into image shards (pipeline.ingest);
3. stand-in for first stage + precompute: shard images downsampled to 32x32 and
   pixel-unshuffled to 16x16x12 "latents" (a fixed, invertible f=2 encoder);
4. train the debug text-to-image UNet and its jointly trained text transformer (ldm library:
   eps objective, min-SNR weighting, 10% caption dropout, EMA), in this process;
5. sample with DDIM for every caption, unguided and with classifier-free guidance;
6. measure caption adherence with the deterministic detector (pipeline.adherence).
Prints one line per stage and, last, one JSON object of the headline figures.

    python -m jobs.demo [--out runs/demo] [--steps 600]
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from ldm.conditioners import TextTransformer
from ldm.diffusion import diffusion_loss
from ldm.ema import EMA
from ldm.guidance import classifier_free_guidance
from ldm.presets import PRESETS
from ldm.samplers import sample_ddim
from ldm.schedules import NoiseSchedule
from ldm.tokenizers import OpenCLIPTokenizer
from ldm.unet import UNet
from pipeline.adherence import adherence
from pipeline.demo_scenes import ALL_SCENES, with_base_url, write_demo_dataset
from pipeline.http_server import LoopbackServer
from pipeline.ingest import IngestConfig, ingest
from pipeline.ray_cluster import RayConfig

PIXELS, UNSHUFFLE = 32, 2  # 32x32 RGB -> 16x16x12


def log(stage: str, message: str, start: float) -> None:
    print(f"[demo] {stage:<8} {message} ({time.perf_counter() - start:.1f} s)", flush=True)


def ingest_demo(data_dir: Path, shards_dir: Path, num_images: int) -> dict:
    """Serve the generated images on loopback and ingest them with img2dataset on Ray."""
    with LoopbackServer(data_dir) as server:
        urls = with_base_url(data_dir / "urls.parquet", server.base_url, data_dir / "urls_served.parquet")
        cfg = IngestConfig(inputs=[str(urls)], output_dir=str(shards_dir), image_size=64, part_size=max(64, num_images // 4),
                           thread_count=16, ray=RayConfig(num_cpus=2, object_store_mb=256))
        return ingest(cfg)


def load_shards(shards_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """Image shards -> stand-in latents (pixel-unshuffled 32x32 images) and captions."""
    samples = wds.WebDataset(sorted(str(p) for p in shards_dir.glob("*.tar")), shardshuffle=False).decode("pil")
    pixels, captions = [], []
    for sample in samples:
        pixels.append(np.asarray(sample["jpg"].convert("RGB").resize((PIXELS, PIXELS), Image.BOX)))
        captions.append(sample["txt"])
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.pixel_unshuffle(x, UNSHUFFLE), captions


def to_images(z_BCHW: torch.Tensor) -> list[np.ndarray]:
    x = F.pixel_shuffle(z_BCHW.float(), UNSHUFFLE).clamp(-1, 1)
    return list(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def build_models(latent_channels: int) -> tuple[UNet, TextTransformer]:
    preset = PRESETS["debug-t2i"]
    unet_cfg = dataclasses.replace(preset.unet, in_channels=latent_channels, out_channels=latent_channels)
    return UNet(unet_cfg), TextTransformer(preset.conditioner.text)


def train(unet, text, z_N, tokens_N, schedule, args, start) -> list[float]:
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    both = torch.nn.ModuleDict({"unet": unet, "text": text})
    ema = EMA(both.named_parameters(), decay=0.999)
    null = text.null_condition(args.batch)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.steps):
        idx = torch.randint(0, len(z_N), (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < args.cond_dropout  # classifier-free guidance dropout
        tokens = torch.where(drop[:, None], null, tokens_N[idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            context = text(tokens)
            loss = diffusion_loss(lambda x, t: unet(x, t, context), z_N[idx], schedule,
                                  min_snr_gamma=args.min_snr_gamma, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 5) == 0:
            log("train", f"step {step + 1}/{args.steps} loss {np.mean(losses[-50:]):.4f}", start)
    ema.copy_to(both)  # sample with the EMA weights
    return losses


@torch.no_grad()
def sample(unet, text, tokenizer, captions, shape, schedule, scale, args) -> torch.Tensor:
    tokens = tokenizer(captions)
    cond, uncond = text(tokens), text(text.null_condition(len(captions)))
    model = classifier_free_guidance(lambda x, t, c: unet(x, t, c), cond, uncond, scale, t_max=args.guidance_t_max)
    x_T = torch.randn(len(captions), *shape, generator=torch.Generator().manual_seed(args.seed + 1))
    return sample_ddim(model, x_T, schedule, num_steps=args.sample_steps, clip_x0=1.0)


def save_grid(images: list[np.ndarray], path: Path, columns: int = 12) -> None:
    rows = [np.concatenate(images[i:i + columns], axis=1) for i in range(0, len(images) - columns + 1, columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((columns * 64, len(rows) * 64), Image.NEAREST).save(path)


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    times, start = {}, time.perf_counter()
    write_demo_dataset(out / "data", args.num_images, seed=args.seed)
    times["generate"] = time.perf_counter() - start
    log("generate", f"{args.num_images} captioned scenes in {out / 'data'}", start)
    t0 = time.perf_counter()
    ingested = ingest_demo(out / "data", out / "shards", args.num_images)
    times["ingest"] = time.perf_counter() - t0
    log("ingest", f"{ingested['downloaded']} images in {ingested['shards']} shards ({ingested['images_per_s']} img/s)",
        start)
    z_N, captions = load_shards(out / "shards")
    log("latents", f"{len(captions)} stand-in latents {tuple(z_N.shape[1:])}", start)

    tokenizer = OpenCLIPTokenizer(PRESETS["debug-t2i"].conditioner.text.max_length)
    schedule = NoiseSchedule.from_config(PRESETS["debug-t2i"].schedule)
    unet, text = build_models(z_N.shape[1])
    t0 = time.perf_counter()
    losses = train(unet, text, z_N, tokenizer(captions), schedule, args, start)
    times["train"] = time.perf_counter() - t0
    img_s = args.steps * args.batch / times["train"]

    t0 = time.perf_counter()
    scenes = [ALL_SCENES[i % len(ALL_SCENES)] for i in range(args.num_samples)]
    prompts = [s.caption for s in scenes]
    result = {}
    for name, scale in (("unconditional", 0.0), ("unguided", 1.0), ("guided", args.guidance_scale)):
        images = to_images(sample(unet, text, tokenizer, prompts, z_N.shape[1:], schedule, scale, args))
        result[name] = adherence(images, scenes)
        save_grid(images, out / f"samples_{name}.png")
    times["sample_eval"] = time.perf_counter() - t0
    log("evaluate", f"adherence (all four attributes) guided {result['guided']['all']:.2f}, "
        f"unguided {result['unguided']['all']:.2f}, unconditional {result['unconditional']['all']:.2f}", start)
    headline = {
        "caption_adherence_guided": result["guided"]["all"],
        "caption_adherence_unguided": result["unguided"]["all"],
        "caption_adherence_unconditional": result["unconditional"]["all"],
        "adherence_by_attribute": result, "guidance_scale": args.guidance_scale,
        "train_steps": args.steps, "train_img_s": round(img_s, 1),
        # mean training loss over the first and the last tenth of the steps
        "loss_first": float(np.mean(losses[:max(1, len(losses) // 10)])),
        "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "ingest": {k: ingested[k] for k in ("downloaded", "shards", "images_per_s")},
        "samples": str(out / "samples_guided.png"), "stand_ins": "latents = pixel-unshuffle of 32x32 images",
    }
    (out / "metrics.json").write_text(json.dumps(headline, indent=2))
    return headline


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--num-images", type=int, default=1152)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--num-samples", type=int, default=144)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--guidance-t-max", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None):
    print(json.dumps(run(parse_args(argv))))


if __name__ == "__main__":
    main()
