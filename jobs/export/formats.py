"""Exports of a trained latent diffusion model: our format, a diffusers folder, the CompVis layout.

`export(cfg)` loads the model (`pipeline.models.bundle.load_ldm`: a run_dir, a checkpoint of any ZeRO
stage with EMA or raw weights, or an export) and writes, all safetensors, under out_dir:

    ours/              pipeline.models.bundle.save_ldm: load_ldm(out_dir/ours) gives the model back
    diffusers/         unet/, vae/, scheduler/ that UNet2DConditionModel / AutoencoderKL / DDIMScheduler
                       .from_pretrained(out_dir/diffusers, subfolder=...) load, plus ldm_conditioner/: tau_theta
                       in our format (the paper's jointly trained text transformer has no diffusers class),
                       and README.md saying how the parts fit; no model_index.json, since no diffusers
                       pipeline class could run these parts together
    compvis/model.safetensors
                       first_stage_model.*, model.diffusion_model.*, cond_stage_model.* (the text transformer
                       as the released model's x-transformers BERTEmbedder, cond_stage_model.transformer.*),
                       model_ema.* (LitEma names, a copy of the exported UNet unless compvis_ema=false) and
                       scale_factor
    export.json        the summary (also printed as the job's last line)

Everything is written into a temporary sibling of out_dir and renamed into place at the end, so a
killed export leaves no half-written folder. What diffusers cannot hold (VQ first stages, UNets without
cross-attention or with scale-shift / ResBlock up-down, channel_mult[0] != 1) is refused before
anything is written, with a message pointing at formats=[ours].
"""
import dataclasses
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.convert.bert import XT_PREFIX, text_transformer_to_xtransformers
from ldm.convert.compvis import join_compvis_state_dict, load_into, unet_to_compvis_ema
from ldm.convert.diffusers import diffusers_export_parts
from ldm.convert.unet import check_diffusers_unet
from ldm.convert.vae import check_diffusers_vae
from ldm.diffusion.conditioners import TextTransformer
from ldm.presets import PRESETS, build_conditioner
from pipeline.models.bundle import WEIGHTS, LDMBundle, load_ldm, save_ldm
from pipeline.shards import atomic_folder

FORMATS = ("ours", "diffusers", "compvis")
CONDITIONER_DIR, CONDITIONER_FORMAT = "ldm_conditioner", "ldm-pipeline/conditioner"
COMPVIS_FILE, SUMMARY_FILE = "model.safetensors", "export.json"
DIFFUSERS_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDIMScheduler"}


@dataclass
class ExportConfig:
    source: str = ""                  # a training run_dir, a checkpoints/step_* folder, or an export folder
    out_dir: str = ""
    weights: str = "ema"              # ema | raw (checkpoints; an export holds the weights it was made from)
    formats: list[str] = field(default_factory=lambda: ["ours"])
    autoencoder: str | None = None    # override the first stage (pipeline.models.autoencoder spec)
    compvis_ema: bool = True          # compvis: also write model_ema.* (see _compvis_state_dict)
    overwrite: bool = False           # replace an existing out_dir (atomically)

    def __post_init__(self):
        unknown = sorted(set(self.formats) - set(FORMATS))
        checks = [(bool(self.source), "set source=<a training run_dir, checkpoint folder or export folder>"),
                  (bool(self.out_dir), "set out_dir=<the folder to write the export into>"),
                  (self.weights in WEIGHTS, f"weights={self.weights!r}: use one of {WEIGHTS}"),
                  (bool(self.formats) and not unknown, f"formats={list(self.formats)}: choose from {list(FORMATS)}"),
                  (len(set(self.formats)) == len(self.formats), f"formats={list(self.formats)} repeats a format")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _latent_hw(bundle: LDMBundle) -> int | tuple[int, int]:
    height, width = bundle.latent_shape[1:]
    return height if height == width else (height, width)


def check_exportable(bundle: LDMBundle, formats: list[str]) -> None:
    """Raise ValueError for every format this model cannot go to, before anything is written."""
    needs_first_stage = [f for f in formats if f in ("diffusers", "compvis")]
    if needs_first_stage and bundle.autoencoder is None:
        raise ValueError(f"formats {needs_first_stage} hold the first stage, which is unknown for {bundle.source['path']} "
                         "(its latents' manifest is gone): pass autoencoder=<the first stage> or use formats=[ours]")
    if "diffusers" not in formats:
        return
    try:
        check_diffusers_unet(bundle.preset.unet)
        check_diffusers_vae(bundle.autoencoder.cfg)
    except ValueError as err:
        raise ValueError(f"no diffusers export for preset {bundle.preset_name!r}: {err} (formats=[ours] "
                         "writes it; formats=[compvis] holds it in the CompVis layout)") from err
    if importlib.util.find_spec("diffusers") is None:
        raise ValueError("formats=[diffusers] needs the diffusers package: `pip install diffusers`")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _own_conditioner_weights(bundle: LDMBundle) -> dict[str, torch.Tensor]:
    """tau_theta's weights when they belong to this model (none for a named pretrained text encoder)."""
    if bundle.conditioner is None or bundle.text_encoder:
        return {}
    return _tensors(bundle.conditioner)


def _json_ready(value):
    return json.loads(json.dumps(value, default=list))


def write_conditioner(bundle: LDMBundle, folder: Path) -> Path | None:
    """tau_theta in our format: config.json (its preset, config, tokenizer, pretrained identity) + model.safetensors."""
    if bundle.conditioner is None:
        return None
    folder.mkdir(parents=True)
    weights = _own_conditioner_weights(bundle)
    if weights:
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"format": CONDITIONER_FORMAT, "version": 1, "preset": bundle.preset_name,
              "kind": bundle.preset.conditioner.kind, "config": dataclasses.asdict(bundle.preset.conditioner),
              "tokenizer": bundle.tokenizer, "text_encoder": bundle.text_encoder}
    (folder / "config.json").write_text(json.dumps(_json_ready(config), indent=2, sort_keys=True))
    return folder


def load_conditioner(folder: str | Path) -> nn.Module:
    """The jointly trained tau_theta that `write_conditioner` wrote (frozen, eval)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != CONDITIONER_FORMAT:
        raise ValueError(f"{folder / 'config.json'} is not of format {CONDITIONER_FORMAT!r}")
    if config.get("text_encoder"):
        raise ValueError(f"{folder} names the pretrained text encoder {config['text_encoder']}: build it with "
                         "pipeline.models.text_encoder.text_encoder_from_identity")
    conditioner = build_conditioner(PRESETS[config["preset"]].conditioner)
    load_into(conditioner, load_file(folder / "model.safetensors"), f"conditioner of {folder}")
    return conditioner.eval().requires_grad_(False)


def _readme(bundle: LDMBundle) -> str:
    return f"""# {bundle.preset_name}: a latent diffusion model (Rombach et al., CVPR 2022) in diffusers' layout

Exported by ldm-pipeline (`python -m jobs.export`) from {bundle.source.get('path')} (step {bundle.source.get('step')},
{bundle.source.get('weights')} weights).

- `unet/`: `UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`, objective {bundle.objective!r}
- `vae/`: `AutoencoderKL.from_pretrained(folder, subfolder="vae")`, scaling_factor {bundle.scale_factor} (App. G)
- `scheduler/`: `DDIMScheduler.from_pretrained(folder, subfolder="scheduler")`, the training noise schedule
- `{CONDITIONER_DIR}/`: tau_theta, the condition encoder whose output is the UNet's `encoder_hidden_states`.
  The paper's text transformer is trained jointly with the UNet and has no diffusers class, so it is stored
  in ldm-pipeline's own format: `jobs.export.formats.load_conditioner(folder / "{CONDITIONER_DIR}")`; its
  tokenizer is {json.dumps(bundle.tokenizer)} (`ldm.diffusion.tokenizers.build_tokenizer`).

There is no `model_index.json`: no diffusers pipeline class runs this text encoder, so load the parts one by
one. The whole model in one folder: the sibling `ours/` export (`pipeline.models.bundle.load_ldm`).
"""


def write_diffusers(bundle: LDMBundle, folder: Path, cfg: ExportConfig) -> Path:
    import diffusers

    parts = diffusers_export_parts(bundle.unet, bundle.autoencoder, bundle.preset.schedule,
                                   latent_size=_latent_hw(bundle), scaling_factor=bundle.scale_factor,
                                   objective=bundle.objective)
    folder.mkdir(parents=True)
    for name, part in parts.items():
        model = getattr(diffusers, DIFFUSERS_CLASSES[name]).from_config(part.config)
        if part.state_dict is not None:
            load_into(model, part.state_dict, f"diffusers {name}")
        model.save_pretrained(folder / name)  # safetensors: diffusers' default
    write_conditioner(bundle, folder / CONDITIONER_DIR)
    (folder / "README.md").write_text(_readme(bundle))
    return folder


def _compvis_conditioner(bundle: LDMBundle) -> dict[str, torch.Tensor]:
    """The text transformer under the released model's x-transformers BERTEmbedder names; others as they are."""
    weights = _own_conditioner_weights(bundle)
    if weights and isinstance(bundle.conditioner, TextTransformer):
        xt = text_transformer_to_xtransformers(weights, bundle.conditioner.cfg)
        return {XT_PREFIX + k: v for k, v in xt.items()}
    return weights


def _compvis_state_dict(bundle: LDMBundle, with_ema: bool) -> dict[str, torch.Tensor]:
    """One model: model.diffusion_model.* holds the exported weights (EMA or raw, as asked). A CompVis
    config with use_ema: true samples model_ema.* instead, so that copy holds the same weights (without it,
    CompVis would keep its LitEma's fresh initialisation)."""
    unet = _tensors(bundle.unet)
    parts = {"unet": unet, "autoencoder": _tensors(bundle.autoencoder), "conditioner": _compvis_conditioner(bundle),
             "other": {"scale_factor": torch.tensor(bundle.scale_factor, dtype=torch.float32)}}
    if with_ema:
        parts["ema"] = unet_to_compvis_ema({k: v.clone() for k, v in unet.items()})  # safetensors stores no aliases
    return join_compvis_state_dict(parts)


def write_compvis(bundle: LDMBundle, folder: Path, cfg: ExportConfig) -> Path:
    folder.mkdir(parents=True)
    metadata = {"format": "ldm-pipeline/compvis", "preset": bundle.preset_name, "autoencoder_preset":
                bundle.preset.autoencoder, "objective": bundle.objective, "scale_factor": repr(bundle.scale_factor),
                "tokenizer": json.dumps(bundle.tokenizer), "text_encoder": json.dumps(bundle.text_encoder),
                "source": json.dumps(bundle.source)}
    save_file(_compvis_state_dict(bundle, cfg.compvis_ema), folder / COMPVIS_FILE, metadata=metadata)
    return folder / COMPVIS_FILE


def write_ours(bundle: LDMBundle, folder: Path, cfg: ExportConfig) -> Path:
    return save_ldm(bundle, folder)


WRITERS = {"ours": write_ours, "diffusers": write_diffusers, "compvis": write_compvis}


def _num_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export(cfg: ExportConfig) -> dict:
    """Write the formats cfg asks for (module doc); returns the summary (also out_dir/export.json)."""
    start, out_dir = time.perf_counter(), Path(cfg.out_dir)
    if out_dir.exists() and not cfg.overwrite:
        raise ValueError(f"out_dir={out_dir} exists: choose another out_dir or set overwrite=true")
    bundle = load_ldm(cfg.source, cfg.weights, cfg.autoencoder)
    check_exportable(bundle, cfg.formats)
    with atomic_folder(out_dir) as tmp:  # a reader sees the old or the new export, never a mix
        written = {fmt: WRITERS[fmt](bundle, tmp / fmt, cfg) for fmt in cfg.formats}
        summary = {"source": bundle.source, "preset": bundle.preset_name, "out_dir": str(out_dir),
                   "formats": {fmt: str(out_dir / path.relative_to(tmp)) for fmt, path in written.items()},
                   "bytes": {fmt: _num_bytes(path) for fmt, path in written.items()},
                   "seconds": round(time.perf_counter() - start, 2)}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
