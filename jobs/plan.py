"""`python -m jobs.plan experiment=t2i-1.45b [data.path=...] [plan.num_gpus=8] [plan.device=H100] [plan.img_per_s_per_gpu=...]`

Prints what a training config will cost, without training: parameter counts, FLOPs per training
image (torch.utils.flop_counter on the meta device, forward + backward), model-state memory per GPU
for each ZeRO stage, the latent dataset's size on disk, and the GPU-hours of the configured run at a
given throughput: plan.img_per_s_per_gpu, else our img/s in the newest bench/gpu.sh results file
(bench/results/) for this preset on plan.device, and it says which. Reads the same config as jobs.train (conf/train.yaml).

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
    throughput = cfg.plan.img_per_s_per_gpu
    if throughput:
        result["throughput_source"] = {"kind": "plan.img_per_s_per_gpu"}
    else:
        measured = bench_throughput(cfg.plan.bench_results, cfg.model.preset, cfg.plan.device,
                                    cfg.trainer.compile, cfg.model.train_text_encoder)
        if measured is not None:
            throughput, result["throughput_source"] = measured["img_per_s"], measured
    if throughput:
        result["img_per_s_per_gpu"] = throughput
        result["gpu_hours"] = num_images / throughput / 3600
        result["wall_hours"] = result["gpu_hours"] / num_gpus
    return result


def bench_throughput(folder: str, preset: str, device: str | None, compiled: bool, joint_text: bool) -> dict | None:
    """Our img/s per GPU from the newest bench/gpu.sh results file (by date, then name) holding a train_step run of
    `preset` on a GPU whose name contains `device` (any GPU when None); smoke files never count. Among that
    file's runs, the one that matches torch.compile and the text encoder's training best. None when none."""
    files = sorted(Path(folder).glob("*.json"), key=lambda f: (f.name[:10], f.name), reverse=True)
    for path in files:
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if record.get("format") != "ldm-pipeline/bench-results" or record.get("smoke"):
            continue
        if device is not None and device.lower() not in str(record.get("device", "")).lower():
            continue
        runs = [(name, run) for name, run in record.get("runs", {}).items()
                if run.get("bench") == "train_step" and run.get("preset") == preset and run.get("ours_img_s")]
        if runs:
            name, run = max(runs, key=lambda r: (r[1].get("compiled") == compiled,
                                                 (r[1].get("text_encoder") == "joint") == joint_text))
            return {"kind": "bench", "file": str(path), "run": name, "device": record["device"],
                    "date": record.get("date"), "img_per_s": run["ours_img_s"], "compiled": run.get("compiled"),
                    "text_encoder": run.get("text_encoder")}
    return None


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
    source = result.get("throughput_source", {})
    origin = (f"measured on {source['device']} ({source['file']}, run {source['run']})" if source.get("kind") == "bench"
              else "plan.img_per_s_per_gpu")
    lines.append(f"GPU-hours {result['gpu_hours']:.0f} at {result['img_per_s_per_gpu']} img/s/GPU, {origin} "
                 f"({result['wall_hours']:.1f} h wall)" if "gpu_hours" in result else
                 "GPU-hours: no bench/gpu.sh result for this preset; set plan.img_per_s_per_gpu or run bench/gpu.sh")
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
