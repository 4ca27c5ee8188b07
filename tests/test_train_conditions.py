"""jobs.train with the conditions y other than jointly trained text (Sec. 3.3): class labels (debug-cin,
guidance dropout to the null class) and a frozen text encoder's context stored by precompute (guidance
dropout to the stored context of ""). One rank in this process, a few steps on tiny latent shards."""
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import jobs.config
from jobs.checkpointing import CheckpointManager
from jobs.config import to_dataclass
from jobs.train.config import TrainConfig
from jobs.train.loop import condition, train
from jobs.train.setup import StoredContext
from ldm.diffusion.conditioners import ClassEmbedder
from ldm.presets import PRESETS
from pipeline.shards import write_shard

CONF = Path(__file__).resolve().parents[1] / "conf"
C, SIZE = PRESETS["debug-cin"].unet.out_channels, PRESETS["debug-cin"].latent_size
NUM_CLASSES = PRESETS["debug-cin"].conditioner.num_classes
L, D = 5, PRESETS["debug-t2i"].unet.context_dim  # stored context: 5 tokens of the UNet's context width
TEXT_ENCODER = {"kind": "openclip", "arch": "local-dir:/models/tiny", "pretrained": None, "layer": "penultimate",
                "name_or_path": None, "sha256": "ab" * 32, "width": D, "max_length": L,
                "null_context": "null_context.npy"}
jobs.config.register_schemas()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_latents(folder: Path, *, num_samples: int = 24, context_width: int | None = None) -> Path:
    """Moments (mean = a per-class sign pattern, logvar -10) with json {"label": i % 4} and caption
    "class {i % 4}"; with `context_width`, a text encoder's context [L, width] per sample + null_context.npy."""
    folder.mkdir(parents=True)
    samples = []
    for i in range(num_samples):
        mean = np.full((C, SIZE, SIZE), (-1.0) ** i * (1 + i % 4) / 4, dtype=np.float32)
        sample = {"__key__": f"{i:06d}", "txt": f"class {i % 4}".encode(),
                  "json": json.dumps({"label": i % 4}).encode(), "latent.npy": npy_bytes(np.concatenate([mean, np.full_like(mean, -10.0)]).astype(np.float16))}
        if context_width:
            sample["context.npy"] = npy_bytes(np.full((L, context_width), i % 4 / 4, dtype=np.float16))
        samples.append(sample)
    write_shard(folder / "00000.tar", samples)
    text_encoder = None
    if context_width:
        text_encoder = TEXT_ENCODER | {"width": context_width}
        np.save(folder / "null_context.npy", np.full((L, context_width), -1.0, dtype=np.float16))
    manifest = {"format": "ldm-pipeline/latents", "schema_version": 1,
                "encoder": {"kind": "kl", "config": {}, "sha256": "test", "source": "test"},
                "resolution": 4 * SIZE, "crop": "center", "dtype": "float16", "storage": "moments",
                "latent_shape": [C, SIZE, SIZE], "scale_factor": 1.0, "scale_factor_source": "config",
                "num_samples": num_samples, "shards": [{"name": "00000.tar", "count": num_samples, "sha256": "",
                                                        "source": ""}],
                "skipped": {}, "tokenizer": None, "text_encoder": text_encoder}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def class_latents(tmp_path_factory) -> Path:
    return write_latents(tmp_path_factory.mktemp("cin") / "latents")


@pytest.fixture(scope="module")
def context_latents(tmp_path_factory) -> Path:
    return write_latents(tmp_path_factory.mktemp("context") / "latents", context_width=D)


def make_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return to_dataclass(compose("train", overrides=overrides), TrainConfig)


def overrides_for(group: dict[str, str], latent_dir: Path, run_dir: Path, max_steps: int, **extra) -> list[str]:
    values = {"data.path": latent_dir, "run_dir": run_dir, "trainer.max_steps": max_steps,
              "trainer.precision": "fp32", "data.batch_size": 4, "data.num_workers": 0, "optim.lr": 1e-3,
              "logger.mode": "disabled", "logger.log_every": 1, "logger.image_every": max_steps,
              "logger.progress_bar": False, "trainer.num_samples": 2, "trainer.sample_steps": 2} | extra
    return [f"{k}={v}" for k, v in group.items()] + [f"{key}={value}" for key, value in values.items()]


CIN = {"model": "debug-cin", "data": "labels"}
CONTEXT = {"data": "context", "model.train_text_encoder": "false"}


def run_train(env, overrides: list[str]) -> int:
    env()
    return train(make_config(overrides))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- configs


def test_class_and_context_groups_compose():
    cfg = make_config(overrides_for(CIN, Path("x"), Path("r"), 1))
    assert (cfg.model.preset, cfg.data.label_key, cfg.data.use_tokens, cfg.condition_key) == (
        "debug-cin", "label", False, "label")
    cfg = make_config(overrides_for(CONTEXT, Path("x"), Path("r"), 1))
    assert (cfg.data.use_context, cfg.model.train_text_encoder, cfg.condition_key) == (True, False, "context")
    assert make_config(["data.path=x", "trainer.max_steps=1"]).condition_key == "tokens"


@pytest.mark.parametrize("overrides, message", [
    (["model=debug-cin"], r"class-conditional: set data.label_key=.* or data.classes_file="),
    (["model=debug-cin", "data=labels", "data.label_key=null"], r"class-conditional: set data.label_key="),
    (["data=context"], r"set model.train_text_encoder=false"),
    (["model=debug-cin", "data=context", "model.train_text_encoder=false"], r"data.use_context=true .*'class'"),
    (["model.preset=debug-sr"], r"concatenates a condition to z_t: set data.condition"),
    (["data.use_tokens=false"], r"data.use_tokens=true .* or data.use_context=true model.train_text_encoder=false"),
])
def test_config_errors_name_what_to_set(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(["data.path=x", "trainer.max_steps=1", *overrides])


# ---------------------------------------------------------------------------------------------- dropout


def _job(cfg: TrainConfig, frozen: torch.nn.Module | None, joint: torch.nn.Module | None):
    """What `condition` reads of a Job."""
    models = SimpleNamespace(frozen_conditioner=frozen, preset=PRESETS[cfg.model.preset])
    return SimpleNamespace(cfg=cfg, models=models, engine=SimpleNamespace(module=SimpleNamespace(conditioner=joint)),
                           dist=SimpleNamespace(device=torch.device("cpu")))


def test_guidance_dropout_replaces_labels_by_the_null_class_and_contexts_by_the_stored_null():
    cfg = make_config(overrides_for(CIN, Path("x"), Path("r"), 1, **{"model.cond_dropout": 0.5}))
    job = _job(cfg, None, ClassEmbedder(NUM_CLASSES, 8))
    labels = torch.arange(64) % NUM_CLASSES
    dropped = condition(job, {"label": labels}, torch.Generator().manual_seed(0))
    kept = dropped == labels
    assert torch.all(dropped[~kept] == NUM_CLASSES) and 10 < int(kept.sum()) < 54  # about half become the null class
    with pytest.raises(ValueError, match=f"class label {NUM_CLASSES} in the data.*has {NUM_CLASSES} classes"):
        condition(job, {"label": torch.tensor([3, NUM_CLASSES])}, torch.Generator().manual_seed(0))

    cfg = make_config(overrides_for(CONTEXT, Path("x"), Path("r"), 1, **{"model.cond_dropout": 0.5}))
    null_LD = torch.full((L, D), -1.0)
    context = torch.rand(64, L, D)
    out = condition(_job(cfg, StoredContext(null_LD), None), {"context": context}, torch.Generator().manual_seed(0))
    kept = (out == context).flatten(1).all(1)
    assert torch.all(out[~kept] == -1.0) and 10 < int(kept.sum()) < 54


# ---------------------------------------------------------------------------------------------- training


def test_class_conditional_preset_trains_with_labels(tmp_path, class_latents, single_process_env):
    """debug-cin on labels from the metadata: finite losses, the class embedding (incl. the null row)
    trained jointly into the EMA, a sample grid of guided class samples."""
    run_dir = tmp_path / "cin"
    assert run_train(single_process_env, overrides_for(CIN, class_latents, run_dir, 3)) == 0
    values = losses(run_dir)
    assert len(values) == 3 and all(np.isfinite(values))
    ema = load_file(str(CheckpointManager(run_dir / "checkpoints").latest() / "ema.safetensors"))
    assert ema["conditioner.embedding.weight"].shape == (NUM_CLASSES + 1, PRESETS["debug-cin"].conditioner.embed_dim)
    assert (run_dir / "images" / "samples_00000003.png").is_file()


def test_classes_file_with_more_classes_than_the_preset_fails_before_training(tmp_path, class_latents,
                                                                                single_process_env):
    (tmp_path / "classes.txt").write_text("\n".join(f"class {i}" for i in range(NUM_CLASSES + 1)))
    overrides = overrides_for(CIN, class_latents, tmp_path / "run", 1,
                              **{"data.label_key": "null", "data.classes_file": tmp_path / "classes.txt"})
    with pytest.raises(ValueError, match=f"names {NUM_CLASSES + 1} classes, model.preset='debug-cin' has "
                                         f"{NUM_CLASSES}"):
        run_train(single_process_env, overrides)


def test_stored_context_trains_without_a_text_encoder_and_checkpoints_its_identity(tmp_path, context_latents,
                                                                                   single_process_env):
    run_dir = tmp_path / "context"
    assert run_train(single_process_env, overrides_for(CONTEXT, context_latents, run_dir, 2)) == 0
    assert all(np.isfinite(losses(run_dir)))
    folder = CheckpointManager(run_dir / "checkpoints").latest()
    ema = load_file(str(folder / "ema.safetensors"))
    assert not any(k.startswith("conditioner.") for k in ema)  # nothing of a text encoder is trained or saved
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"]["text_encoder"] == TEXT_ENCODER  # what a sampler must rebuild
    assert (run_dir / "images" / "samples_00000002.png").is_file()


def test_stored_context_of_another_width_or_encoder_fails_before_training(tmp_path, single_process_env):
    narrow = write_latents(tmp_path / "narrow", context_width=32)
    with pytest.raises(ValueError, match="context width: the stored context is 32 wide .* context_dim is 64"):
        run_train(single_process_env, overrides_for(CONTEXT, narrow, tmp_path / "a", 1))
    plain = write_latents(tmp_path / "plain")
    with pytest.raises(ValueError, match="rerun jobs.precompute with text_encoder.kind=openclip"):
        run_train(single_process_env, overrides_for(CONTEXT, plain, tmp_path / "b", 1))
    wide = write_latents(tmp_path / "wide", context_width=D)
    pinned = overrides_for(CONTEXT, wide, tmp_path / "c", 1) + ["+model.text_encoder.sha256=" + "cd" * 32]
    with pytest.raises(ValueError, match="model.text_encoder names weights sha256 cdcd.*unset model.text_encoder"):
        run_train(single_process_env, pinned)
