"""Reading the checkpoints `python -m jobs.train` writes, without DeepSpeed's engine or a process group.

    RUN/checkpoints/step_XXXXXXXX/   complete when it holds COMPLETE (jobs/checkpointing.py)
        deepspeed/                   the engine's checkpoint (DeepSpeed tag "deepspeed"), any ZeRO stage
        ema.safetensors              full EMA of jobs.train.setup.TrainModule: "unet.*", "conditioner.*", "num_updates"
        config.yaml                  the TrainConfig of the run
        rank_XXXXX.pt, COMPLETE

The names are repeated here, not imported: pipeline/ does not depend on jobs/ (tests/test_ldm_bundle.py
checks that they agree). Raw weights of ZeRO 1-3 come from DeepSpeed's own offline consolidation
(`zero_to_fp32`), on the CPU, from the fp32 master partitions of every rank; ZeRO-0 files hold the
whole module.
"""
import contextlib
import re
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

EMA_FILE, CONFIG_FILE, DEEPSPEED_TAG = "ema.safetensors", "config.yaml", "deepspeed"
COMPLETE_MARKER, CHECKPOINTS_DIR = "COMPLETE", "checkpoints"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
ZERO0_MODEL_FILE = "mp_rank_00_model_states.pt"
NUM_UPDATES_KEY = "num_updates"  # ldm.diffusion.ema's counter, stored next to the EMA weights
# The only non-torch classes DeepSpeed pickles into its checkpoint files (seen with DeepSpeed 0.19,
# ZeRO 1-3): a file naming any other global is refused before it is unpickled.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.runtime.zero.config.ZeroStageEnum")


def is_checkpoint_dir(path: Path) -> bool:
    """A step folder of jobs.train (complete or not)."""
    return STEP_DIR.match(path.name) is not None and (path / CONFIG_FILE).is_file()


def checkpoint_step(folder: Path) -> int:
    return int(STEP_DIR.match(folder.name).group(1))


def _newest_complete(root: Path) -> Path | None:
    complete = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return max(complete, key=checkpoint_step, default=None)


def resolve_checkpoint(path: str | Path) -> Path:
    """The step folder `path` names: itself (it must be complete), or the newest complete one of a
    run_dir (RUN/checkpoints/step_*) or of a checkpoint root. ValueError saying what is there otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist: pass a training run_dir, one of its checkpoints/step_* "
                         "folders, or an export folder (jobs.export)")
    if STEP_DIR.match(path.name):
        if not (path / COMPLETE_MARKER).is_file():
            raise ValueError(f"{path} has no {COMPLETE_MARKER} marker: its save was cut off. Pass the run_dir "
                             "(its newest complete checkpoint is taken) or an earlier step folder")
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        newest = _newest_complete(root) if root.is_dir() else None
        if newest is not None:
            return newest
    if (path / CHECKPOINTS_DIR).is_dir():
        raise ValueError(f"{path / CHECKPOINTS_DIR} holds no complete checkpoint (step_* with {COMPLETE_MARKER}): "
                         "train until the first checkpoint, or pass an export folder")
    raise ValueError(f"{path} is neither an export folder (config.json of format 'ldm-pipeline/ldm') nor a "
                     "training run_dir (checkpoints/step_*) nor a checkpoint folder: pass one of those")


def read_train_config(folder: Path) -> dict:
    """config.yaml of the run, as plain containers (OmegaConf writes plain YAML)."""
    return yaml.safe_load((folder / CONFIG_FILE).read_text())


def ema_weights(folder: Path) -> dict[str, torch.Tensor]:
    """TrainModule's EMA weights (fp32), without the update counter."""
    path = folder / EMA_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {EMA_FILE}: load it with weights=raw")
    return {k: v for k, v in load_file(path).items() if k != NUM_UPDATES_KEY}


def _check_pickles(ds_dir: Path) -> list[Path]:
    """Refuse any DeepSpeed file whose pickle names a global outside torch's weights-only set and
    DEEPSPEED_GLOBALS; found by scanning the opcodes, without unpickling."""
    files = sorted(ds_dir.glob("*.pt"))
    if not files:
        raise ValueError(f"{ds_dir} holds no DeepSpeed *.pt files: the checkpoint is incomplete; use weights=ema")
    for path in files:
        unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(DEEPSPEED_GLOBALS))
        if unknown:
            raise ValueError(f"{path} pickles {unknown}, which a DeepSpeed checkpoint of jobs.train never holds; "
                             "refusing to unpickle it (use weights=ema, which is safetensors)")
    return files


def _deepspeed_classes() -> list[type]:
    import importlib

    modules_and_names = (name.rpartition(".") for name in DEEPSPEED_GLOBALS)
    return [getattr(importlib.import_module(module), cls) for module, _, cls in modules_and_names]


def raw_weights(folder: Path) -> dict[str, torch.Tensor]:
    """TrainModule's live (non-EMA) fp32 weights from the DeepSpeed checkpoint of any ZeRO stage.

    DeepSpeed's readers unpickle with weights_only=False (its files hold three of its own classes).
    `_check_pickles` first proves that every file names only torch's weights-only globals and those
    three classes, so the unpickling cannot call anything else: the files are then as safe as a
    weights-only load, whoever wrote them.
    """
    ds_dir = folder / DEEPSPEED_TAG
    files = _check_pickles(ds_dir)
    if not any(p.name.endswith("_optim_states.pt") for p in files):  # ZeRO-0: the module is whole
        with torch.serialization.safe_globals(_deepspeed_classes()):
            states = torch.load(ds_dir / ZERO0_MODEL_FILE, map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines would mix with a job's JSON summary
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    return {k: v.float() for k, v in state.items()}


def split_train_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet": ..., "conditioner": ...}: TrainModule's parts, prefixes stripped (either may be empty)."""
    parts = {"unet": {}, "conditioner": {}}
    for key, tensor in state_dict.items():
        part, _, rest = key.partition(".")
        if part not in parts:
            raise ValueError(f"unexpected key {key!r} in a jobs.train checkpoint (expected unet.* / conditioner.*)")
        parts[part][rest] = tensor
    return parts
