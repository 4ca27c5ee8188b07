"""The files of a classifier of noisy latents (jobs.train_classifier's out_dir), which jobs.sample loads.

    out_dir/classifier.safetensors   the LatentClassifier's weights
    out_dir/classifier.json          {"format": "ldm-pipeline/latent-classifier", "version": 1, "num_classes",
                                      "pool", "unet" (its UNetConfig), "latent_shape" [C, h, w], "preset",
                                      "schedule", "scale_factor", "source" (the LDM's), "labels", "step"}
    out_dir/train_state.safetensors  AdamW's state tensors ("optimizer.<param>.<name>") and torch's RNG ("rng.*")
    out_dir/train_state.json         step, AdamW's param groups, the loader position, the training config

Everything is written into a temporary folder that then replaces out_dir as a whole (pipeline.shards.
atomic_folder), so a killed job leaves the previous save or the new one, never a mix; nothing is pickled.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldm.diffusion.classifier import LatentClassifier
from ldm.diffusion.unet import UNetConfig
from pipeline.shards import atomic_folder

FORMAT, VERSION = "ldm-pipeline/latent-classifier", 1
WEIGHTS_FILE, CONFIG_FILE = "classifier.safetensors", "classifier.json"
STATE_TENSORS_FILE, STATE_FILE = "train_state.safetensors", "train_state.json"


def classifier_record(classifier: LatentClassifier, bundle, labels: dict, step: int) -> dict:
    """What classifier.json says about the classifier and the LDM whose latents and noise it learned."""
    record = {"format": FORMAT, "version": VERSION, "num_classes": classifier.num_classes, "pool": classifier.pool,
              "unet": asdict(classifier.cfg), "latent_shape": [classifier.cfg.in_channels, *classifier.latent_hw],
              "preset": bundle.preset_name, "schedule": asdict(bundle.preset.schedule),
              "scale_factor": bundle.scale_factor, "source": bundle.source, "labels": labels, "step": step}
    return json.loads(json.dumps(record, default=str))


def read_record(folder: str | Path) -> dict | None:
    """classifier.json of `folder`, or None when there is none; ValueError for another format or version."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a latent classifier (format {record.get('format')!r}): give the out_dir "
                         "of jobs.train_classifier")
    if record.get("version") != VERSION:
        raise ValueError(f"{path} is {FORMAT} version {record.get('version')}; this code reads version {VERSION}")
    return record


def build_classifier(record: dict) -> LatentClassifier:
    unet = record["unet"]
    cfg = UNetConfig(**{**unet, "channel_mult": tuple(unet["channel_mult"]),
                        "attention_ds": tuple(unet["attention_ds"])})
    return LatentClassifier(cfg, record["num_classes"], tuple(record["latent_shape"][1:]), record["pool"])


def load_classifier(folder: str | Path) -> tuple[LatentClassifier, dict]:
    """(the classifier, eval and frozen, on the CPU; its record) from a jobs.train_classifier out_dir."""
    record = read_record(folder)
    if record is None:
        raise ValueError(f"classifier={str(folder)!r} holds no {CONFIG_FILE}: give the out_dir of "
                         "jobs.train_classifier")
    classifier = build_classifier(record)
    classifier.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    return classifier.eval().requires_grad_(False), record


def check_classifier_fits(record: dict, bundle, where: str) -> None:
    """ValueError unless the classifier learned the noise of this LDM: its schedule's t and its latent scale."""
    if record["schedule"] != json.loads(json.dumps(asdict(bundle.preset.schedule))):
        raise ValueError(f"classifier={where!r} was trained on the noise schedule {record['schedule']} (preset "
                         f"{record['preset']!r}), the model has {asdict(bundle.preset.schedule)}: its timesteps mean "
                         "other noise levels; train a classifier for this model (jobs.train_classifier source=...)")
    if float(record["scale_factor"]) != float(bundle.scale_factor):
        raise ValueError(f"classifier={where!r} was trained on latents scaled by {record['scale_factor']}, the model "
                         f"sees them scaled by {bundle.scale_factor} (App. G): train a classifier for this model")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            assert isinstance(value, Tensor), f"optimizer state {name} is not a tensor"
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _rng_tensors() -> dict[str, Tensor]:
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return rng


def save(folder: str | Path, classifier: LatentClassifier, record: dict, optimizer: torch.optim.Optimizer,
         train_state: dict) -> None:
    """Weights, record and the resume state (module doc), atomically as one folder."""
    tensors, groups = _optimizer_tensors(optimizer)
    with atomic_folder(folder) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        save_file(tensors | _rng_tensors(), str(tmp / STATE_TENSORS_FILE), metadata={"format": "pt"})
        state = {**train_state, "optimizer_param_groups": groups}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def resume(folder: str | Path, classifier: LatentClassifier, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights, AdamW state and torch's RNG saved in `folder`; returns train_state.json."""
    folder = Path(folder)
    classifier.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    state = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(str(folder / STATE_TENSORS_FILE))
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state.pop("optimizer_param_groups")]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state
