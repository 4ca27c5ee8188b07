"""One UNet training step (forward, backward, AdamW) of ours against diffusers' UNet2DConditionModel.

Both are built with the same configuration (the parameter counts are checked equal) and
timed in the same process, alternating rounds so that drift of the machine hits both alike.
Prints one JSON line: img/s of both and the ratio ours / peer (>= 1.0 means ours is as fast).

    python bench/unet_step.py                      # CPU, a small cross-attention UNet
    python bench/unet_step.py --gpu                # the 1.45B preset's UNet, batch 128, 32x32x4, bf16
    python bench/unet_step.py --gpu --compile      # the same under torch.compile
"""
import argparse
import json
from contextlib import nullcontext

import torch
from timing import img_per_s, matmul_peak

from ldm.diffusion.unet import UNet, UNetConfig

CPU_CONFIG = UNetConfig(4, 4, 64, (1, 2, 4), 1, (2, 4), num_heads=4, context_dim=128)


def t2i_unet_config() -> UNetConfig:
    from ldm.presets import PRESETS

    return PRESETS["ldm-kl8-t2i-1.45b"].unet


def diffusers_peer(cfg: UNetConfig, sample_size: int):
    """diffusers' UNet2DConditionModel with the same blocks as `cfg` (SD-style cross-attention UNet)."""
    from diffusers import UNet2DConditionModel

    levels = range(len(cfg.channel_mult))
    attn = [2 ** i in cfg.attention_ds for i in levels]
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' name for the number of heads in SD-1 UNets
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        transformer_layers_per_block=cfg.transformer_depth)


def make_step(model, forward, batch, device, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step():
        with autocast:
            out = forward(model, *batch)
            loss = torch.nn.functional.mse_loss(out.float(), batch[0].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def flops_per_image(model, forward, batch) -> float:
    """Training FLOPs per image (forward + backward) counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward(model, *batch).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch[0].shape[0]


def ours_forward(model, x, t, context):
    return model(x, t, context)


def peer_forward(model, x, t, context):
    return model(x, t, encoder_hidden_states=context).sample


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="1.45B preset UNet on CUDA, bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    device = torch.device("cuda" if args.gpu else "cpu")
    cfg = t2i_unet_config() if args.gpu else CPU_CONFIG
    size, batch_size = (32, args.batch or 128) if args.gpu else (32, args.batch or 8)
    num_steps = args.steps or (10 if args.gpu else 3)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    torch.manual_seed(0)
    ours, peer = UNet(cfg).to(device), diffusers_peer(cfg, size).to(device)
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, peer)]
    if counts[0] != counts[1]:
        raise SystemExit(f"configs differ: ours {counts[0]} parameters, peer {counts[1]}")
    batch = (torch.randn(batch_size, cfg.in_channels, size, size, device=device),
             torch.randint(0, 1000, (batch_size,), device=device),
             torch.randn(batch_size, 77, cfg.context_dim, device=device))
    flops = flops_per_image(ours, ours_forward, batch) if args.gpu else None
    if args.compile:
        ours, peer = torch.compile(ours), torch.compile(peer)
    steps = {"ours": make_step(ours, ours_forward, batch, device, dtype),
             "peer": make_step(peer, peer_forward, batch, device, dtype)}
    img_s = img_per_s(steps, batch_size, num_steps, args.rounds, device)
    result = {"bench": "unet_step", "device": torch.cuda.get_device_name() if args.gpu else "cpu",
              "config": "ldm-kl8-t2i-1.45b" if args.gpu else "cpu-small", "batch": batch_size,
              "latent": [cfg.in_channels, size, size], "dtype": str(dtype).removeprefix("torch."),
              "compiled": args.compile, "num_params": counts[0],
              "ours_img_s": round(img_s["ours"], 2), "peer_img_s": round(img_s["peer"], 2),
              "ratio": round(img_s["ours"] / img_s["peer"], 3)}
    if flops is not None:
        peak = matmul_peak(device, dtype, 8192)
        result |= {"train_flops_per_image": flops, "matmul_peak_tflops": round(peak / 1e12, 1),
                   "ours_mfu": round(img_s["ours"] * flops / peak, 3), "peer_mfu": round(img_s["peer"] * flops / peak, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
