"""A trained latent diffusion model in one object: what sampling, evaluation, export and the demo load.

`load_ldm(source, weights, autoencoder)` reads
- an export folder (`save_ldm`, or `python -m jobs.export formats=[ours]`):
      config.json        {"format": "ldm-pipeline/ldm", "version": 1, "preset", "objective", "scale_factor",
                          "tokenizer", "latent_shape", "source", "text_encoder" (identity or null)}
      unet.safetensors, conditioner.safetensors (when tau_theta has weights), autoencoder/ (when known);
- a training checkpoint (RUN/checkpoints/step_XXXXXXXX of jobs.train) or a run_dir (its newest complete
  checkpoint), with weights "ema" (ema.safetensors) or "raw" (the DeepSpeed checkpoint of any ZeRO stage,
  pipeline/models/checkpoint.py). The first stage, the latent scale factor (App. G) and the tokenizer come
  from the training data's manifest (config.yaml -> data.path -> manifest.json, encoder.source).

A run trained on stored contexts (data.use_context) names its frozen OpenCLIP / HF CLIP text encoder in
config.yaml (model.text_encoder, a pipeline.models.text_encoder identity): it is rebuilt from there and
checked against the sha256 of its weights, in checkpoints and exports alike (exports do not copy it).
Any other run trained with model.train_text_encoder=false has no conditioner in its checkpoint: it trained
with the preset's tau_theta as initialised, frozen. jobs.train seeds torch with `seed` right before it
builds the UNet and then the conditioner (jobs/train_loop.setup, jobs/train_setup.build_models), so the
same two constructions under the same seed rebuild it exactly (tests/test_ldm_bundle.py holds this).
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.convert.compvis import load_into
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.unet import UNet
from ldm.presets import PRESETS, LDMPreset, build_conditioner
from pipeline.latents.manifest import MANIFEST_FILE, read_manifest
from pipeline.models.autoencoder import load_autoencoder, save_autoencoder
from pipeline.models.checkpoint import (
    checkpoint_step,
    ema_weights,
    raw_weights,
    read_train_config,
    resolve_checkpoint,
    split_train_module,
)
from pipeline.shards import atomic_folder

FORMAT, VERSION = "ldm-pipeline/ldm", 1
CONFIG_FILE, UNET_FILE, CONDITIONER_FILE, AUTOENCODER_DIR = ("config.json", "unet.safetensors",
                                                             "conditioner.safetensors", "autoencoder")
WEIGHTS = ("ema", "raw")


@dataclass
class LDMBundle:
    preset_name: str                  # key of ldm.presets.PRESETS
    preset: LDMPreset
    unet: UNet                        # eval(), requires_grad_(False)
    conditioner: nn.Module | None     # tau_theta, eval + frozen, or None (unconditional)
    autoencoder: nn.Module | None     # the frozen first stage (decode z / scale_factor); None if unknown
    scale_factor: float               # z_model = scale_factor * z_first_stage (App. G)
    tokenizer: dict | None            # {"kind", "name_or_path", "max_length"} -> ldm.diffusion.tokenizers.build_tokenizer
    schedule: NoiseSchedule           # NoiseSchedule.from_config(preset.schedule)
    objective: str                    # "eps" | "v"
    latent_shape: tuple[int, int, int]  # [C, h, w] the model was trained on
    source: dict                      # {"kind": "export" | "checkpoint", "path", "step", "weights": "ema" | "raw"}
    text_encoder: dict | None = None  # the frozen pretrained text encoder that is `conditioner` (data.use_context
    #                                   runs): its pipeline.models.text_encoder identity; None for the preset's own

    def to(self, device: torch.device | str) -> "LDMBundle":
        """Moves unet / conditioner / autoencoder to `device` (in place); returns self."""
        for module in (self.unet, self.conditioner, self.autoencoder):
            if module is not None:
                module.to(device)
        return self


def _frozen(module: nn.Module | None) -> nn.Module | None:
    return None if module is None else module.eval().requires_grad_(False)


def _unet(preset: LDMPreset, state_dict: dict[str, torch.Tensor], where: str) -> UNet:
    with torch.device("meta"):
        unet = UNet(preset.unet)
    unet = unet.to_empty(device="cpu")
    load_into(unet, state_dict, f"UNet of {where}")
    return _frozen(unet)


def _conditioner(preset: LDMPreset, state_dict: dict[str, torch.Tensor] | None, where: str) -> nn.Module | None:
    conditioner = build_conditioner(preset.conditioner)
    if conditioner is not None and state_dict is not None:
        load_into(conditioner, state_dict, f"conditioner of {where}")
    return _frozen(conditioner)


def _frozen_conditioner(preset: LDMPreset, seed: int) -> nn.Module | None:
    """tau_theta as jobs.train built it, frozen, when model.train_text_encoder=false (module doc)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet(preset.unet)  # replays the UNet's random draws, which come first
        return _frozen(build_conditioner(preset.conditioner))


def _pretrained_text_encoder(identity: dict, where: str) -> nn.Module:
    """The frozen OpenCLIP / HF CLIP encoder whose stored context the UNet was trained on (data.use_context)."""
    from pipeline.models.text_encoder import text_encoder_from_identity

    try:
        return _frozen(text_encoder_from_identity(identity))
    except (ValueError, OSError, RuntimeError) as err:
        raise ValueError(f"{where} was trained on the context of the frozen text encoder {identity}, which cannot "
                         f"be rebuilt here: {err}") from err


def _autoencoder(spec: str | Path, preset: LDMPreset, what: str) -> tuple[nn.Module, dict]:
    """(model, identity); CompVis files take the LDM preset's first-stage config."""
    try:
        model, _, identity = load_autoencoder(spec, preset=preset.autoencoder)
    except ValueError as err:
        raise ValueError(f"{what}: {err}. Pass autoencoder=<our folder | diffusers folder | CompVis file> "
                         "to load the model with another first stage") from err
    return model, identity


def _spec_of(encoder_source: str) -> str | None:
    """manifest encoder.source ("ours:PATH", "diffusers:PATH_OR_ID", "compvis:PATH:PRESET") -> a load spec."""
    kind, _, rest = encoder_source.partition(":")
    if kind == "compvis":
        return rest.rpartition(":")[0]
    return rest if kind in ("ours", "diffusers") and rest else None


def _manifest_autoencoder(manifest: dict, data_path: Path, preset: LDMPreset) -> nn.Module | None:
    encoder = manifest["encoder"]
    spec = _spec_of(encoder["source"])
    where = f"the autoencoder of {data_path / MANIFEST_FILE}"
    if spec is None:  # e.g. latents written by hand: the first stage is unknown
        warnings.warn(f"{where} is named {encoder['source']!r}, not a loadable source: the bundle has no first "
                      "stage; pass autoencoder=<the first stage the latents were made with> to decode images")
        return None
    if not Path(spec).exists() and encoder["source"].startswith(("ours:", "compvis:")):
        raise ValueError(f"{where} was {spec}, which is gone; pass autoencoder=<its new path> (any spec "
                         "pipeline.models.autoencoder.load_autoencoder takes) to load it from elsewhere")
    model, identity = _autoencoder(spec, preset, where)
    if identity["sha256"] != encoder["sha256"]:
        raise ValueError(f"{where} ({spec}) now holds other weights (sha256 {identity['sha256'][:12]}... vs "
                         f"{encoder['sha256'][:12]}... when the latents were made); pass autoencoder=<the "
                         "first stage the latents were made with>")
    return model


def _data_manifest(config: dict) -> tuple[Path, dict | None]:
    data_path = Path(config["data"]["path"])
    return data_path, read_manifest(data_path) if (data_path / MANIFEST_FILE).is_file() else None


def _scale_factor(manifest: dict | None, preset: LDMPreset, data_path: Path) -> float:
    if manifest is not None:
        return float(manifest["scale_factor"])
    if preset.scale_factor is not None:
        return preset.scale_factor
    raise ValueError(f"the training data's {data_path / MANIFEST_FILE} is gone, and with it the latent scale "
                     "factor the model was trained with (App. G); restore that manifest (run from the folder "
                     "the training ran in if data.path is relative)")


def _load_checkpoint(folder: Path, weights: str, autoencoder: str | None) -> LDMBundle:
    config = read_train_config(folder)
    preset_name, model_cfg = config["model"]["preset"], config["model"]
    preset = PRESETS[preset_name]
    parts = split_train_module(ema_weights(folder) if weights == "ema" else raw_weights(folder))
    where = f"{folder} ({weights} weights)"
    unet = _unet(preset, parts["unet"], where)
    text_encoder = model_cfg.get("text_encoder") or None  # OmegaConf writes an unset dict as {}
    if text_encoder:
        conditioner = _pretrained_text_encoder(text_encoder, str(folder))
    elif parts["conditioner"] or model_cfg.get("train_text_encoder", True):
        conditioner = _conditioner(preset, parts["conditioner"], where)
    else:
        conditioner = _frozen_conditioner(preset, int(config["seed"]))
    data_path, manifest = _data_manifest(config)
    first_stage = None
    if autoencoder is not None:
        first_stage = _autoencoder(autoencoder, preset, f"autoencoder={autoencoder}")[0]
    elif manifest is not None:
        first_stage = _manifest_autoencoder(manifest, data_path, preset)
    latent_shape = manifest["latent_shape"] if manifest else (preset.unet.out_channels, *[preset.latent_size] * 2)
    return LDMBundle(preset_name, preset, unet, conditioner, first_stage,
                     _scale_factor(manifest, preset, data_path), manifest.get("tokenizer") if manifest else None,
                     NoiseSchedule.from_config(preset.schedule), model_cfg.get("objective") or preset.objective,
                     tuple(latent_shape), {"kind": "checkpoint", "path": str(folder),
                                           "step": checkpoint_step(folder), "weights": weights}, text_encoder)


def _read_export_config(folder: Path) -> dict | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        return None
    if config.get("version") != VERSION:
        raise ValueError(f"{path} is {FORMAT} version {config.get('version')}; this code reads version {VERSION}")
    return config


def _load_export(folder: Path, config: dict, weights: str, autoencoder: str | None) -> LDMBundle:
    preset = PRESETS[config["preset"]]
    stored = dict(config["source"])
    if weights != stored.get("weights"):
        warnings.warn(f"{folder} holds {stored.get('weights')} weights (an export holds one set); "
                      f"weights={weights!r} applies to training checkpoints only")
    unet = _unet(preset, load_file(folder / UNET_FILE), str(folder))
    cond_path, text_encoder = folder / CONDITIONER_FILE, config.get("text_encoder") or None
    if text_encoder:
        conditioner = _pretrained_text_encoder(text_encoder, str(folder))
    else:
        conditioner = _conditioner(preset, load_file(cond_path) if cond_path.is_file() else None, str(folder))
        if conditioner is not None and not cond_path.is_file() and any(True for _ in conditioner.parameters()):
            raise ValueError(f"{folder} has no {CONDITIONER_FILE} but preset {config['preset']!r} has a trained "
                             "conditioner: re-export the model")
    ae_spec = autoencoder or (folder / AUTOENCODER_DIR if (folder / AUTOENCODER_DIR).is_dir() else None)
    first_stage = _autoencoder(ae_spec, preset, f"autoencoder {ae_spec}")[0] if ae_spec is not None else None
    return LDMBundle(config["preset"], preset, unet, conditioner, first_stage, float(config["scale_factor"]),
                     config["tokenizer"], NoiseSchedule.from_config(preset.schedule), config["objective"],
                     tuple(config["latent_shape"]), {**stored, "kind": "export", "path": str(folder),
                                                     "exported_from": stored.get("path")}, text_encoder)


def load_ldm(source: str | Path, weights: str = "ema", autoencoder: str | None = None) -> LDMBundle:
    """The model at `source` (an export folder, a training checkpoint folder or a run_dir); see the module doc.

    weights: "ema" | "raw" (training checkpoints; an export holds the weights it was exported with).
    autoencoder: overrides the first stage (any spec pipeline.models.autoencoder.load_autoencoder takes).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    path = Path(source)
    config = _read_export_config(path) if path.is_dir() else None
    if config is not None:
        return _load_export(path, config, weights, autoencoder)
    return _load_checkpoint(resolve_checkpoint(path), weights, autoencoder)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_ldm(bundle: LDMBundle, folder: str | Path) -> Path:
    """Write `bundle` in our export format (module doc) into a temp folder, then rename it into place
    (an existing folder is replaced as a whole)."""
    with atomic_folder(folder) as tmp:
        save_file(_tensors(bundle.unet), tmp / UNET_FILE, metadata={"format": "pt"})
        # A frozen pretrained text encoder is named by its identity (rebuilt and checked on load), not copied.
        if not bundle.text_encoder and bundle.conditioner is not None and bundle.conditioner.state_dict():
            save_file(_tensors(bundle.conditioner), tmp / CONDITIONER_FILE, metadata={"format": "pt"})
        if bundle.autoencoder is not None:
            save_autoencoder(bundle.autoencoder, bundle.autoencoder.cfg, tmp / AUTOENCODER_DIR,
                             scale_factor=bundle.scale_factor, source=f"ldm export of {bundle.source.get('path')}")
        config = {"format": FORMAT, "version": VERSION, "preset": bundle.preset_name, "objective": bundle.objective,
                  "scale_factor": bundle.scale_factor, "tokenizer": bundle.tokenizer,
                  "latent_shape": list(bundle.latent_shape), "source": bundle.source,
                  "text_encoder": bundle.text_encoder}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(folder)
