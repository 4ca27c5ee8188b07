"""`python -m jobs.export`: a real jobs.train checkpoint -> our format, a diffusers folder, the
CompVis layout; each read back by our loader and by diffusers (from_pretrained, its CompVis converter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import CONF, ROOT, assert_float32_close, tiny_bundle, tiny_training_run
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import jobs.config
from jobs.export.formats import ExportConfig, export, load_conditioner
from ldm.convert.bert import text_transformer_from_xtransformers
from ldm.convert.compvis import compvis_ema_to_unet, load_into, split_compvis_state_dict
from ldm.convert.unet import unet_to_diffusers
from ldm.diffusion.unet import UNet
from ldm.presets import build_conditioner
from pipeline.models.autoencoder import load_autoencoder, state_dict_sha256
from pipeline.models.bundle import load_ldm, save_ldm

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_training_run(tmp_path_factory.mktemp("train"), zero_stage=2, steps=2)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The real command line, every format, EMA weights: (out_dir, the summary line it printed)."""
    tmp = tmp_path_factory.mktemp("export")
    out = tmp / "t2i"
    command = [sys.executable, "-m", "jobs.export", f"source={run_dir}", f"out_dir={out}",
               "formats=[ours,diffusers,compvis]", f"hydra.run.dir={tmp / 'hydra'}"]
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def make_config(overrides: list[str]) -> ExportConfig:
    jobs.config.register_schemas()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return jobs.config.to_dataclass(compose("export", overrides=overrides), ExportConfig)


def assert_same_state(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, different[:5]


def test_command_line_writes_every_format_atomically_with_a_summary(exported, run_dir):
    out, summary = exported
    assert summary["formats"] == {"ours": str(out / "ours"), "diffusers": str(out / "diffusers"),
                                  "compvis": str(out / "compvis" / "model.safetensors")}
    assert summary["source"] == {"kind": "checkpoint", "path": str(run_dir / "checkpoints/step_00000002"),
                                 "step": 2, "weights": "ema"}
    assert json.loads((out / "export.json").read_text()) == summary
    assert all(summary["bytes"][fmt] > 1e6 for fmt in summary["formats"])
    assert [p.name for p in out.parent.iterdir() if p.name != "hydra"] == ["t2i"]  # no temporary folder left
    weights = [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_ours_loads_back_exactly(exported, run_dir):
    bundle, loaded = load_ldm(run_dir), load_ldm(exported[0] / "ours")
    for name in ("unet", "conditioner", "autoencoder"):
        assert_same_state(getattr(loaded, name).state_dict(), getattr(bundle, name).state_dict())
    assert (loaded.scale_factor, loaded.tokenizer, loaded.latent_shape) == (
        bundle.scale_factor, bundle.tokenizer, bundle.latent_shape)
    assert loaded.source["exported_from"] == bundle.source["path"] and loaded.source["weights"] == "ema"


def test_diffusers_folder_loads_with_from_pretrained_and_gives_the_same_outputs(exported, run_dir):
    folder, bundle = exported[0] / "diffusers", load_ldm(run_dir)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert vae.config.scaling_factor == bundle.scale_factor and scheduler.config.prediction_type == "epsilon"
    conditioner = load_conditioner(folder / "ldm_conditioner")
    assert_same_state(conditioner.state_dict(), bundle.conditioner.state_dict())
    tokens = torch.tensor([[49406, 320, 1000, 49407] + [0] * 12, [49406, 49407] + [0] * 14])
    z, t = torch.randn(2, *bundle.latent_shape), torch.tensor([3, 777])
    with torch.no_grad():
        context = conditioner(tokens)
        ours, theirs = bundle.unet(z, t, context), unet(z, t, encoder_hidden_states=context).sample
        assert_float32_close(theirs, ours)
        image_ours, image_theirs = bundle.autoencoder.decode(z), vae.decode(z).sample
        assert_float32_close(image_theirs, image_ours)
    # Our autoencoder loader reads the diffusers vae/ back to the same weights.
    _, _, identity = load_autoencoder(folder, subfolder="vae")
    assert identity["sha256"] == state_dict_sha256(bundle.autoencoder.state_dict())
    assert "ldm_conditioner" in (folder / "README.md").read_text() and not (folder / "model_index.json").exists()


def test_compvis_file_loads_back_exactly_in_ours_and_diffusers_reader(exported, run_dir):
    path, bundle = exported[0] / "compvis" / "model.safetensors", load_ldm(run_dir)
    state = load_file(path)
    parts = split_compvis_state_dict(state)
    unet = UNet(bundle.preset.unet)
    load_into(unet, parts["unet"], "UNet")
    assert_same_state(unet.state_dict(), bundle.unet.state_dict())
    assert_same_state(compvis_ema_to_unet(parts["ema"], bundle.preset.unet), bundle.unet.state_dict())
    xt = {k.removeprefix("transformer."): v for k, v in parts["conditioner"].items()}  # BERTEmbedder names
    assert set(parts["conditioner"]) == {f"transformer.{k}" for k in xt} and "token_emb.weight" in xt
    text = build_conditioner(bundle.preset.conditioner)
    load_into(text, text_transformer_from_xtransformers(xt, text.cfg), "text transformer")
    assert_same_state(text.state_dict(), bundle.conditioner.state_dict())
    assert parts["other"] == {"scale_factor": torch.tensor(bundle.scale_factor)}
    model, _, _ = load_autoencoder(path, preset="debug-kl")  # our loader of CompVis files
    assert_same_state(model.state_dict(), bundle.autoencoder.state_dict())
    config = json.loads((exported[0] / "diffusers" / "unet" / "config.json").read_text())
    for extract_ema in (False, True):
        theirs = single_file_utils.convert_ldm_unet_checkpoint(state, config, extract_ema=extract_ema)
        assert_same_state(theirs, unet_to_diffusers(bundle.unet.state_dict(), bundle.preset.unet))


def test_raw_weights_export(run_dir, tmp_path):
    out = tmp_path / "raw"
    summary = export(make_config([f"source={run_dir}", f"out_dir={out}", "weights=raw", "formats=[ours,compvis]",
                                  "compvis_ema=false"]))
    raw = load_ldm(run_dir, "raw")
    assert summary["source"]["weights"] == "raw"
    assert_same_state(load_ldm(out / "ours").unet.state_dict(), raw.unet.state_dict())
    parts = split_compvis_state_dict(load_file(out / "compvis" / "model.safetensors"))
    assert parts["ema"] == {}  # compvis_ema=false
    assert_same_state(parts["unet"], raw.unet.state_dict())


def test_what_diffusers_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    source = save_ldm(tiny_bundle("debug-uncond"), tmp_path / "uncond")  # VQ first stage, no cross-attention
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no diffusers export for preset 'debug-uncond'.*formats=\[ours\]"):
        export(make_config([f"source={source}", f"out_dir={out}", "formats=[ours,diffusers]"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uncond"]
    summary = export(make_config([f"source={source}", f"out_dir={out}", "formats=[ours,compvis]"]))
    assert set(summary["formats"]) == {"ours", "compvis"}


def test_an_existing_out_dir_is_replaced_only_with_overwrite(tmp_path):
    source = save_ldm(tiny_bundle("debug-cin"), tmp_path / "cin")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists: choose another out_dir or set overwrite=true"):
        export(make_config([f"source={source}", f"out_dir={out}"]))
    assert (out / "keep.txt").read_text() == "mine"
    export(make_config([f"source={source}", f"out_dir={out}", "overwrite=true", "formats=[diffusers]"]))
    assert sorted(p.name for p in out.iterdir()) == ["diffusers", "export.json"]
    conditioner = load_conditioner(out / "diffusers" / "ldm_conditioner")  # the class embedding, in our format
    assert conditioner.embedding.weight.shape == (11, 64)


@pytest.mark.parametrize("override, key", [("formats=[onnx]", "formats"), ("weights=best", "weights"),
                                           ("formats=[ours,ours]", "formats")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        make_config(["source=x", "out_dir=y", override])


def test_missing_source_is_named():
    with pytest.raises(ValueError, match="source"):
        make_config(["out_dir=y"])


def test_atomic_folder_replaces_the_whole_folder_or_leaves_the_old_one(tmp_path):
    from pipeline.shards import atomic_folder

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_folder(folder) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("writer failed")
    assert [p.name for p in folder.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_folder(folder) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
