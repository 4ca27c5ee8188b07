"""`python -m jobs.plan experiment=t2i-1.45b [data.path=...] [plan.num_gpus=8] [plan.img_per_s_per_gpu=...]`

Prints what a training config will cost, without training: parameter counts, FLOPs per training
image (torch.utils.flop_counter on the meta device, forward + backward), model-state memory per GPU
for each ZeRO stage, the latent dataset's size on disk, and the GPU-hours of the configured run at a
given throughput. Reads the same config as jobs.train (conf/train.yaml).

Memory per GPU (model states only; activations, buffers and fragmentation come on top). We train
fp32 weights under bf16 autocast (jobs/train/setup.py), so with P trainable parameters and N GPUs:
weights 4P, gradients 4P, AdamW m and v 8P, EMA 4P bytes, and ZeRO partitions them as in
Rajbhandari et al. 2020 (Fig. 1), with the EMA following the weights:
    stage 0: 20P     stage 1: 12P + 8P/N     stage 2: 8P + 12P/N     stage 3: 20P/N
A frozen text encoder adds 4 bytes per parameter on every GPU.
"""
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from jobs.config import hydra_main
from jobs.train.config import TrainConfig
from jobs.train.setup import train_flops_per_image
from ldm.diffusion.unet import UNet
from ldm.presets import PRESETS, build_conditioner, num_params

UNSET_PATH = "(unset)"


def memory_per_gpu(trainable: int, frozen: int, num_gpus: int) -> dict[str, float]:
    """GiB of model states per GPU for ZeRO stages 0-3 (module doc)."""
    per_stage = {0: 20 * trainable, 1: 12 * trainable + 8 * trainable / num_gpus,
                 2: 8 * trainable + 12 * trainable / num_gpus, 3: 20 * trainable / num_gpus}
    return {f"zero{stage}": (nbytes + 4 * frozen) / 2**30 for stage, nbytes in per_stage.items()}


def parameter_counts(cfg: TrainConfig) -> dict[str, int]:
    preset = PRESETS[cfg.model.preset]
    with torch.device("meta"):
        unet, conditioner = UNet(preset.unet), build_conditioner(preset.conditioner)
    text = num_params(conditioner)
    trainable = num_params(unet) + (text if cfg.model.train_text_encoder else 0)
    return {"unet": num_params(unet), "conditioner": text, "trainable": trainable,
            "frozen": num_params(unet) + text - trainable}


def dataset_size(path: str) -> dict | None:
    """Bytes of the latent shards the manifest lists (None when data.path is unset or absent)."""
    folder = Path(path)
    if path == UNSET_PATH or not (folder / "manifest.json").is_file():
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    sizes = [(folder / shard["name"]).stat().st_size for shard in manifest["shards"]
             if (folder / shard["name"]).is_file()]
    return {"num_samples": manifest["num_samples"], "num_shards": len(manifest["shards"]),
            "bytes_on_disk": sum(sizes), "bytes_per_sample": sum(sizes) / max(1, manifest["num_samples"])}


def plan(cfg: TrainConfig) -> dict:
    counts = parameter_counts(cfg)
    num_gpus = cfg.plan.num_gpus
    global_batch = cfg.data.batch_size * cfg.trainer.grad_accum_steps * num_gpus
    num_images = global_batch * cfg.trainer.max_steps
    flops = train_flops_per_image(cfg.model.preset, cfg.model.train_text_encoder)
    result = {"preset": cfg.model.preset, "params": counts, "train_flops_per_image": flops,
              "num_gpus": num_gpus, "global_batch": global_batch, "max_steps": cfg.trainer.max_steps,
              "num_images": num_images, "total_train_flops": flops * num_images,
              "memory_per_gpu_gib": memory_per_gpu(counts["trainable"], counts["frozen"], num_gpus),
              "dataset": dataset_size(cfg.data.path)}
    if cfg.plan.img_per_s_per_gpu:
        result["img_per_s_per_gpu"] = cfg.plan.img_per_s_per_gpu
        result["gpu_hours"] = num_images / cfg.plan.img_per_s_per_gpu / 3600
        result["wall_hours"] = result["gpu_hours"] / num_gpus
    return result


def format_plan(result: dict) -> str:
    params = result["params"]
    lines = [f"preset {result['preset']}: UNet {params['unet'] / 1e6:.1f}M, conditioner "
             f"{params['conditioner'] / 1e6:.1f}M, trainable {params['trainable'] / 1e6:.1f}M",
             f"train FLOPs per image {result['train_flops_per_image'] / 1e9:.2f} GFLOP; run: "
             f"{result['max_steps']} steps x {result['global_batch']} = {result['num_images']:.3g} images, "
             f"{result['total_train_flops']:.3g} FLOP",
             "model-state memory per GPU (GiB, no activations): " + ", ".join(
                 f"{k} {v:.1f}" for k, v in result["memory_per_gpu_gib"].items()) + f" on {result['num_gpus']} GPUs"]
    data = result["dataset"]
    lines.append("dataset: data.path unset or not found" if data is None else
                 f"dataset: {data['num_samples']} samples in {data['num_shards']} shards, "
                 f"{data['bytes_on_disk'] / 2**30:.2f} GiB on disk")
    lines.append(f"GPU-hours {result['gpu_hours']:.0f} at {result['img_per_s_per_gpu']} img/s/GPU "
                 f"({result['wall_hours']:.1f} h wall)" if "gpu_hours" in result else
                 "GPU-hours: set plan.img_per_s_per_gpu (measure it with bench/train_step.py)")
    return "\n".join(lines)


def _allow_unset_data_path(cfg: DictConfig) -> None:
    """A plan needs no data: an unset data.path gets a placeholder before TrainConfig's checks."""
    if OmegaConf.is_missing(cfg.data, "path") or not cfg.data.path:
        cfg.data.path = UNSET_PATH


def run(cfg: TrainConfig) -> dict:
    result = plan(cfg)
    print(format_plan(result))
    return result  # hydra_main prints it as the JSON line


main = hydra_main("train", TrainConfig, run, name="plan", prepare=_allow_unset_data_path)

if __name__ == "__main__":
    main()
