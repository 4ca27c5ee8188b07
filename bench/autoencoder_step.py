"""One first-stage training step (reconstruction + KL, Sec. 3.1) of ours against diffusers' AutoencoderKL.

Both models are built from the same AutoencoderConfig (diffusers' through ldm.convert.vae's
config mapping), get the same weights (converted), and are checked to reconstruct the
same images before timing. A step: encode, sample z ~ q(z|x), decode, L1 + 1e-6 * KL,
backward, Adam. LPIPS and the discriminator are left out: diffusers has no counterpart.
Rounds alternate between the two so that drift of the machine hits both alike. Prints one
JSON line: img/s of both and the ratio ours / peer (>= 1.0: ours is at least as fast).

    python bench/autoencoder_step.py               # CPU: debug-kl, 32x32, fp32
    python bench/autoencoder_step.py --gpu         # kl-f8 (Tab. 8), 256x256, bf16 autocast
"""
import argparse
import json
from contextlib import nullcontext

import torch
from timing import img_per_s

from ldm.autoencoder.config import AUTOENCODER_PRESETS
from ldm.autoencoder.model import AutoencoderKL
from ldm.convert.vae import autoencoder_to_diffusers, diffusers_vae_config

KL_WEIGHT = 1e-6


def diffusers_peer(ours: AutoencoderKL):
    """diffusers' AutoencoderKL with our config and our weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    peer = DiffusersAutoencoderKL.from_config(diffusers_vae_config(ours.cfg))
    peer.load_state_dict(autoencoder_to_diffusers(ours.state_dict(), ours.cfg))
    return peer


def ours_loss(model, x):
    x_rec, kl = model(x)
    return (x - x_rec.float()).abs().mean() + KL_WEIGHT * kl.float()


def peer_loss(model, x):
    posterior = model.encode(x).latent_dist
    x_rec = model.decode(posterior.sample()).sample
    return (x - x_rec.float()).abs().mean() + KL_WEIGHT * posterior.kl().float().mean()


@torch.no_grad()
def check_same_model(ours, peer, x) -> float:
    """Max |difference| of the two reconstructions from the posterior mean (fp32)."""
    rec_ours = ours.decode(ours.encode_moments(x)[:, :ours.cfg.embed_dim])
    rec_peer = peer.decode(peer.encode(x).latent_dist.mode()).sample
    return (rec_ours - rec_peer).abs().max().item()


def make_step(model, loss_fn, x, device, dtype):
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.5, 0.9))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step():
        with autocast:
            loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="kl-f8 at 256x256 on CUDA, bf16 autocast")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    device = torch.device("cuda" if args.gpu else "cpu")
    preset, size = ("kl-f8", 256) if args.gpu else ("debug-kl", 32)
    batch_size = args.batch or (12 if args.gpu else 8)  # 12: CompVis' kl-f8 batch per GPU
    num_steps = args.steps or (10 if args.gpu else 5)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    torch.manual_seed(0)
    ours = AutoencoderKL(AUTOENCODER_PRESETS[preset])
    peer = diffusers_peer(ours)
    ours, peer = ours.to(device), peer.to(device)
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, peer)]
    x = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    max_diff = check_same_model(ours, peer, x[:2])
    tolerance = 2e-2 if args.gpu else 1e-3  # cuDNN may pick TF32 convolutions for fp32 on the GPU
    if counts[0] != counts[1] or max_diff > tolerance:
        raise SystemExit(f"models differ: {counts} parameters, reconstructions differ by {max_diff}")
    steps = {"ours": make_step(ours, ours_loss, x, device, dtype),
             "peer": make_step(peer, peer_loss, x, device, dtype)}
    img_s = img_per_s(steps, batch_size, num_steps, args.rounds, device)
    print(json.dumps({
        "bench": "autoencoder_step", "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "config": preset, "image_size": size, "batch": batch_size, "dtype": str(dtype).removeprefix("torch."),
        "num_params": counts[0], "threads": torch.get_num_threads(), "max_reconstruction_diff": max_diff,
        "ours_img_s": round(img_s["ours"], 2), "peer_img_s": round(img_s["peer"], 2),
        "ratio": round(img_s["ours"] / img_s["peer"], 3)}))


if __name__ == "__main__":
    main()
