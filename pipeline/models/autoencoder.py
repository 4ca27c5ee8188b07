"""Frozen first-stage autoencoders (Sec. 3.1) in and out of files: ours, diffusers' and CompVis'.

`load_autoencoder(spec)` accepts
- our folder (`save_autoencoder`): config.json `{"format": "ldm-pipeline/autoencoder", ...}` + model.safetensors;
- a diffusers `AutoencoderKL` folder (config.json with `_class_name`), a diffusers pipeline folder
  (its `vae/` subfolder), or a hub id "org/name" loaded with diffusers' `from_pretrained`;
- a CompVis `.ckpt` / `.safetensors`: a whole LDM (`first_stage_model.*` keys) or a first-stage
  checkpoint (`encoder.*`, `decoder.*`, `loss.*`); its config is not in the file, so `preset` names the
  `AUTOENCODER_PRESETS` entry it was trained with.
and returns `(model, cfg, identity)`: the model in eval mode with frozen weights, its config and
`identity = {"kind", "config", "sha256", "source", "scale_factor"}`. `sha256` hashes the state dict in
our layout (names, dtypes, shapes, bytes), so the same weights have the same identity from any source.
`scale_factor` is the latent scale stored with the weights (our config.json, diffusers'
`scaling_factor`; None for CompVis files), App. G.
"""
import dataclasses
import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.autoencoder.config import AUTOENCODER_PRESETS, NUM_GROUPS, AutoencoderConfig
from ldm.autoencoder.model import build_autoencoder
from ldm.convert.compvis import first_stage_weights, load_into, split_compvis_state_dict
from ldm.convert.vae import autoencoder_from_diffusers
from pipeline.models.weights import load_state_dict
from pipeline.shards import atomic_folder

FORMAT, VERSION = "ldm-pipeline/autoencoder", 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
COMPVIS_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
EXPECTED = (f"our autoencoder folder ({CONFIG_FILE} + {WEIGHTS_FILE}), a diffusers AutoencoderKL folder, "
            f"a hub id 'org/name', or a CompVis {'/'.join(COMPVIS_SUFFIXES)} file with a preset")


def config_to_dict(cfg: AutoencoderConfig) -> dict:
    """JSON-ready `asdict(cfg)`: tuples become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(config: dict) -> AutoencoderConfig:
    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"autoencoder config has unknown keys {unknown}; expected a subset of {sorted(fields)}")
    return AutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Stable hash of a state dict: key order, storage layout and file format do not matter."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_autoencoder(model: torch.nn.Module, cfg: AutoencoderConfig, folder: str | Path,
                     scale_factor: float | None = None, source: str = "") -> Path:
    """Write our artifact (formats.md) into a temp folder, then rename it into place."""
    with atomic_folder(folder) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if not k.startswith("loss.")}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config = {"format": FORMAT, "version": VERSION, "config": config_to_dict(cfg),
                  "scale_factor": scale_factor, "source": source}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(folder)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _finish(cfg: AutoencoderConfig, state_dict: dict, where: str, source: str,
            scale_factor: float | None) -> tuple[torch.nn.Module, AutoencoderConfig, dict]:
    model = build_autoencoder(cfg)
    load_into(model, state_dict, f"autoencoder {where}")
    identity = {"kind": cfg.kind, "config": config_to_dict(cfg), "sha256": state_dict_sha256(model.state_dict()),
                "source": source, "scale_factor": scale_factor}
    return _frozen(model), cfg, identity


def _load_ours(folder: Path, config: dict):
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"{folder / CONFIG_FILE} is format {config.get('format')!r} version "
                         f"{config.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}; re-export the autoencoder")
    cfg = config_from_dict(config["config"])
    return _finish(cfg, load_file(folder / WEIGHTS_FILE), str(folder), f"ours:{folder}", config.get("scale_factor"))


def config_from_diffusers(config: dict) -> AutoencoderConfig:
    """The `AutoencoderConfig` of a diffusers `AutoencoderKL` config (the inverse of `diffusers_vae_config`)."""
    unsupported = [(config.get("norm_num_groups", NUM_GROUPS) != NUM_GROUPS, f"norm_num_groups != {NUM_GROUPS}"),
                   (not config.get("use_quant_conv", True), "use_quant_conv=False"),
                   (not config.get("use_post_quant_conv", True), "use_post_quant_conv=False"),
                   (config.get("shift_factor") not in (None, 0.0), "a shift_factor"),
                   (config.get("act_fn", "silu") != "silu", "act_fn other than silu")]
    reasons = [reason for bad, reason in unsupported if bad]
    if reasons:
        raise ValueError(f"this diffusers AutoencoderKL has {', '.join(reasons)}; our KL autoencoder "
                         "(CompVis layout, Sec. 3.1) cannot hold it")
    widths = list(config["block_out_channels"])
    size = config.get("sample_size", 256)
    resolution = size[0] if isinstance(size, (list, tuple)) else size
    attention = [resolution // 2 ** i for i, name in enumerate(config["down_block_types"]) if name.startswith("Attn")]
    return AutoencoderConfig(
        "kl", tuple(w // widths[0] for w in widths), config["latent_channels"], config["latent_channels"],
        base_channels=widths[0], num_res_blocks=config["layers_per_block"], attn_resolutions=tuple(attention),
        mid_attention=config.get("mid_block_add_attention", True), resolution=resolution,
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3))


def _load_diffusers(spec: str, subfolder: str | None):
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ValueError(f"autoencoder {spec!r} is a diffusers model: `pip install diffusers` to load it") from err
    try:
        vae = AutoencoderKL.from_pretrained(spec, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a diffusers AutoencoderKL from {spec!r}"
                         f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {err}. Expected {EXPECTED}; "
                         "offline, a hub id works only when it is in the local cache") from err
    cfg = config_from_diffusers(dict(vae.config))
    state_dict = autoencoder_from_diffusers(vae.state_dict(), cfg)
    where = spec if subfolder is None else f"{spec}/{subfolder}"
    return _finish(cfg, state_dict, where, f"diffusers:{where}", vae.config.get("scaling_factor"))


def _read_compvis(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = load_state_dict(path)
    except (pickle.UnpicklingError, RuntimeError, OSError) as err:
        raise ValueError(f"could not read {path} as a weights-only torch checkpoint or safetensors file ({err}); "
                         "torch.load(weights_only=True) refuses pickled objects: save just the state dict") from err
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds no plain state dict (tensors by name, optionally under 'state_dict')")
    return state_dict


def _load_compvis(path: Path, preset: str | None):
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"{path} is a CompVis checkpoint, whose config is not in the file: set the autoencoder "
                         f"preset to the one it was trained with, one of {sorted(AUTOENCODER_PRESETS)} "
                         f"(got {preset!r})")
    state_dict = _read_compvis(path)
    first_stage = split_compvis_state_dict(state_dict)["autoencoder"]
    if not first_stage:  # a standalone first-stage checkpoint: no prefix, plus the loss' weights
        first_stage = first_stage_weights(state_dict)
    if not any(k.startswith("encoder.") for k in first_stage):
        raise ValueError(f"{path} holds no autoencoder weights: expected first_stage_model.* keys (a whole LDM) "
                         "or encoder.* / decoder.* keys (a first-stage checkpoint)")
    return _finish(AUTOENCODER_PRESETS[preset], first_stage, f"{path} (preset {preset})",
                   f"compvis:{path}:{preset}", None)


def _load_folder(folder: Path, subfolder: str | None):
    if subfolder is None and (folder / "model_index.json").is_file():
        subfolder = "vae"  # a diffusers pipeline folder: its autoencoder
    config_path = folder / (subfolder or "") / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder} has no {config_path.relative_to(folder)}; expected {EXPECTED}")
    config = json.loads(config_path.read_text())
    if "_class_name" in config:
        if config["_class_name"] != "AutoencoderKL":
            raise ValueError(f"{config_path} describes a diffusers {config['_class_name']}; expected an AutoencoderKL")
        return _load_diffusers(str(folder), subfolder)
    return _load_ours(folder / (subfolder or ""), config)


def load_autoencoder(spec: str | Path, preset: str | None = None,
                     subfolder: str | None = None) -> tuple[torch.nn.Module, AutoencoderConfig, dict]:
    """(frozen model in eval mode on the CPU, its config, its identity) from any source above."""
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path, subfolder)
    if path.is_file():
        if path.suffix not in COMPVIS_SUFFIXES:
            raise ValueError(f"{path} is a {path.suffix or 'suffix-less'} file; expected {EXPECTED}")
        return _load_compvis(path, preset)
    if HUB_ID.match(str(spec)) and not str(spec).endswith(COMPVIS_SUFFIXES):
        return _load_diffusers(str(spec), subfolder)
    raise ValueError(f"no autoencoder at {str(spec)!r}: the path does not exist. Expected {EXPECTED}")
