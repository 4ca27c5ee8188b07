"""The trained-model bundle (pipeline/models/bundle.py): loading real jobs.train checkpoints of every ZeRO stage
(EMA and raw weights), our export format, and the errors a user meets."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from factories import ROOT, perturb, tiny_bundle, tiny_training_run
from safetensors.torch import load_file, save_file

import jobs.checkpointing
import jobs.train.loop
import pipeline.models.checkpoint as train_checkpoint
from ldm.presets import PRESETS
from pipeline.models.autoencoder import load_autoencoder, state_dict_sha256
from pipeline.models.bundle import load_ldm, save_ldm

LATEST = "checkpoints/step_00000002"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_training_run(tmp_path_factory.mktemp("zero2"), zero_stage=2, steps=2)


def train_module_state(bundle) -> dict[str, torch.Tensor]:
    """The bundle's weights under jobs.train's TrainModule names."""
    state = {f"unet.{k}": v for k, v in bundle.unet.state_dict().items()}
    if bundle.conditioner is not None:
        state |= {f"conditioner.{k}": v for k, v in bundle.conditioner.state_dict().items()}
    return state


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def assert_same_bundle(a, b):
    for name in ("unet", "conditioner", "autoencoder"):
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None), name
        if ma is not None:
            assert_same_weights(ma.state_dict(), mb.state_dict())
    for name in ("preset_name", "scale_factor", "tokenizer", "objective", "latent_shape"):
        assert getattr(a, name) == getattr(b, name), name


def test_names_agree_with_what_jobs_train_writes():
    assert (train_checkpoint.EMA_FILE, train_checkpoint.CONFIG_FILE, train_checkpoint.DEEPSPEED_TAG) == (
        jobs.train.loop.EMA_FILE, jobs.train.loop.CONFIG_FILE, jobs.train.loop.DEEPSPEED_TAG)
    assert train_checkpoint.COMPLETE_MARKER == jobs.checkpointing.COMPLETE_MARKER
    assert train_checkpoint.STEP_DIR.pattern == jobs.checkpointing.STEP_DIR.pattern


def test_run_dir_and_checkpoint_folder_load_the_same_model(run_dir):
    bundle = load_ldm(run_dir)
    assert_same_bundle(bundle, load_ldm(run_dir / LATEST))
    assert bundle.source == {"kind": "checkpoint", "path": str(run_dir / LATEST), "step": 2, "weights": "ema"}
    assert (bundle.preset_name, bundle.objective, bundle.latent_shape, bundle.scale_factor) == (
        "debug-t2i", "eps", (4, 16, 16), 1.0)
    assert bundle.tokenizer == {"kind": "openclip", "name_or_path": None, "max_length": 16}
    assert bundle.text_encoder is None  # tau_theta is the preset's, trained jointly
    assert not bundle.unet.training and not any(p.requires_grad for p in bundle.unet.parameters())
    assert not any(p.requires_grad for p in bundle.conditioner.parameters())
    # The first stage is the one the latents' manifest names (tmp/autoencoder), bit for bit.
    _, _, identity = load_autoencoder(run_dir.parent / "autoencoder")
    assert state_dict_sha256(bundle.autoencoder.state_dict()) == identity["sha256"]
    assert len(bundle.schedule.betas) == 1000


def test_ema_and_raw_weights_differ_and_are_what_training_wrote(run_dir):
    folder = run_dir / LATEST
    ema, raw = load_ldm(run_dir, "ema"), load_ldm(run_dir, "raw")
    stored_ema = {k: v for k, v in load_file(folder / "ema.safetensors").items() if k != "num_updates"}
    assert_same_weights(train_module_state(ema), stored_ema)
    # ZeRO-2 on one rank keeps the whole fp32 module in the engine's model file: the live weights.
    engine = torch.load(folder / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert_same_weights(train_module_state(raw), dict(engine))
    differ = [k for k, v in train_module_state(ema).items() if not torch.equal(v, engine[k])]
    # After 2 steps only the layers that got gradients have moved (the UNet's zero-initialised output
    # layer blocks the rest at step 1); there EMA and live weights differ.
    assert "unet.out.2.weight" in differ and len(differ) >= 20


def test_unet_of_the_bundle_runs(run_dir):
    bundle = load_ldm(run_dir)
    tokens = bundle.conditioner.null_condition(2)
    with torch.no_grad():
        eps = bundle.unet(torch.randn(2, *bundle.latent_shape), torch.tensor([10, 900]), bundle.conditioner(tokens))
        images = bundle.autoencoder.decode(torch.randn(1, *bundle.latent_shape) / bundle.scale_factor)
    assert eps.shape == (2, *bundle.latent_shape) and torch.isfinite(eps).all()
    assert images.shape == (1, 3, 64, 64)


# trainer.ema_decay=0: the EMA jobs.train writes is then the live weights, exactly (lerp with weight 1
# returns its end point), gathered by the training job itself (all-gather of the ZeRO-3 slices): an
# independent copy of what consolidating the DeepSpeed files must give.
LIVE_EMA = {"trainer.ema_decay": 0.0}


@pytest.mark.parametrize("stage", [0, 1, 3])  # ZeRO-2: test_ema_and_raw_weights_differ_and_are_what_training_wrote
def test_raw_weights_of_every_zero_stage_are_the_live_weights(tmp_path, run_dir, stage):
    run = tiny_training_run(tmp_path, zero_stage=stage, steps=2, extra=LIVE_EMA)
    raw = train_module_state(load_ldm(run, "raw"))
    assert_same_weights(raw, train_module_state(load_ldm(run, "ema")))
    # The same seed, data and steps as the ZeRO-2 run: the same training, up to ZeRO-3's 1x1-conv
    # weight gradients (seen 6e-8 apart).
    reference = train_module_state(load_ldm(run_dir, "raw"))
    assert all(torch.allclose(raw[k], reference[k], rtol=0, atol=1e-6) for k in raw)


@pytest.mark.slow
def test_zero3_on_two_ranks_consolidates_to_the_gathered_weights(tmp_path):
    """torchrun, 2 ranks, ZeRO-3: each rank's optimizer file holds its fp32 partitions; consolidated they
    equal the whole weights the job all-gathered (LIVE_EMA)."""
    run = tiny_training_run(tmp_path, zero_stage=3, steps=2, num_ranks=2, extra=LIVE_EMA)
    assert {p.name for p in (run / LATEST / "deepspeed").glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    raw, ema = load_ldm(run, "raw"), load_ldm(run, "ema")
    assert_same_weights(train_module_state(raw), train_module_state(ema))
    assert raw.conditioner.token_embedding.weight.shape == (49408, 64)


def test_frozen_text_encoder_is_rebuilt_exactly(tmp_path, monkeypatch):
    """train_text_encoder=false: the checkpoint has no conditioner; the bundle rebuilds the one training used."""
    built = {}
    real_build_models = jobs.train.loop.build_models

    def recording_build_models(cfg, device, **kwargs):
        built["models"] = real_build_models(cfg, device, **kwargs)
        return built["models"]

    monkeypatch.setattr(jobs.train.loop, "build_models", recording_build_models)
    run = tiny_training_run(tmp_path, steps=1, train_text_encoder=False, seed=3)
    assert not any(k.startswith("conditioner.") for k in load_file(run / "checkpoints/step_00000001/ema.safetensors"))
    bundle = load_ldm(run)
    assert_same_weights(bundle.conditioner.state_dict(), built["models"].frozen_conditioner.state_dict())


@pytest.mark.parametrize("preset", ["debug-t2i", "debug-cin", "debug-uncond", "debug-sr"])
def test_save_ldm_round_trip_is_exact(tmp_path, preset):
    bundle = tiny_bundle(preset, seed=1)
    folder = save_ldm(bundle, tmp_path / "export")
    loaded = load_ldm(folder, weights="raw")
    assert_same_bundle(loaded, bundle)
    assert loaded.source["kind"] == "export" and loaded.source["exported_from"] is None
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "unet.safetensors", "autoencoder"] + (["conditioner.safetensors"]
                                                              if preset in ("debug-t2i", "debug-cin") else []))
    assert not [p for p in tmp_path.iterdir() if p.name != "export"]  # no temporary folder left


def test_export_of_a_checkpoint_round_trips_and_replaces_atomically(tmp_path, run_dir):
    bundle = load_ldm(run_dir, "raw")
    save_ldm(tiny_bundle(), tmp_path / "export")  # something else there first: replaced as a whole
    loaded = load_ldm(save_ldm(bundle, tmp_path / "export"), weights="raw")
    assert_same_bundle(loaded, bundle)
    assert loaded.source["step"] == 2 and loaded.source["weights"] == "raw"
    assert loaded.source["exported_from"] == str(run_dir / LATEST)
    with pytest.warns(UserWarning, match="holds raw weights"):
        load_ldm(tmp_path / "export", weights="ema")


def tiny_open_clip(folder: Path, width: int) -> str:
    """A random tiny OpenCLIP in an open_clip `local-dir:` folder, buildable by name offline."""
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1}}
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def test_a_stored_context_run_rebuilds_its_frozen_text_encoder(tmp_path, run_dir):
    """data.use_context runs name their OpenCLIP / HF CLIP encoder in config.yaml (model.text_encoder); the
    checkpoint here is the ZeRO-2 run's with that config (same UNet shapes: context width 64)."""
    from pipeline.models.text_encoder import TextEncoderConfig, load_text_encoder

    arch = tiny_open_clip(tmp_path / "clip", PRESETS["debug-t2i"].unet.context_dim)
    encoder, identity = load_text_encoder(TextEncoderConfig(kind="openclip", arch=arch))
    folder = tmp_path / "run" / LATEST
    shutil.copytree(run_dir / LATEST, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model"] |= {"text_encoder": identity, "train_text_encoder": False}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    bundle = load_ldm(tmp_path / "run")
    assert bundle.text_encoder == identity
    assert_same_weights(bundle.conditioner.state_dict(), encoder.state_dict())
    assert not any(p.requires_grad for p in bundle.conditioner.parameters())
    exported = save_ldm(bundle, tmp_path / "export")
    assert not (exported / "conditioner.safetensors").exists()  # named by identity, not copied
    loaded = load_ldm(exported)
    assert loaded.text_encoder == identity
    assert_same_bundle(loaded, bundle)


def test_bundle_to_moves_every_module():
    bundle = tiny_bundle().to("meta")
    assert {p.device.type for m in (bundle.unet, bundle.conditioner, bundle.autoencoder) for p in m.parameters()} == {
        "meta"}


# ---------------------------------------------------------------------------------------------- errors


def test_a_folder_of_neither_format_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="neither an export folder .* nor a training run_dir"):
        load_ldm(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_ldm(tmp_path / "missing")
    with pytest.raises(ValueError, match="weights='best'"):
        load_ldm(tmp_path, weights="best")


def test_no_complete_checkpoint_is_refused(tmp_path, run_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / LATEST / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        load_ldm(copy)
    with pytest.raises(ValueError, match="no COMPLETE marker: its save was cut off"):
        load_ldm(copy / LATEST)


def test_a_manifest_whose_autoencoder_is_gone_says_which_and_how_to_override(tmp_path, run_dir):
    moved = tmp_path / "moved_autoencoder"
    original = run_dir.parent / "autoencoder"
    shutil.move(original, moved)
    try:
        with pytest.raises(ValueError, match=f"was {original}, which is gone; pass autoencoder="):
            load_ldm(run_dir)
        bundle = load_ldm(run_dir, autoencoder=str(moved))
        assert state_dict_sha256(bundle.autoencoder.state_dict()) == load_autoencoder(moved)[2]["sha256"]
    finally:
        shutil.move(moved, original)


def test_an_autoencoder_with_other_weights_is_refused(tmp_path, run_dir):
    from pipeline.models.autoencoder import save_autoencoder

    folder = run_dir.parent / "autoencoder"
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    model, cfg, _ = load_autoencoder(folder)
    save_autoencoder(perturb(model, torch.Generator().manual_seed(5)), cfg, folder)
    try:
        with pytest.raises(ValueError, match="now holds other weights"):
            load_ldm(run_dir)
    finally:
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)


def test_latents_that_name_no_loadable_autoencoder_give_a_bundle_without_one(tmp_path, run_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    latents = tmp_path / "latents"
    shutil.copytree(run_dir.parent / "latents", latents)
    manifest = json.loads((latents / "manifest.json").read_text())
    manifest["encoder"]["source"] = "test"
    (latents / "manifest.json").write_text(json.dumps(manifest))
    config = yaml.safe_load((copy / LATEST / "config.yaml").read_text())
    config["data"]["path"] = str(latents)
    (copy / LATEST / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="'test', not a loadable source: the bundle has no first stage"):
        bundle = load_ldm(copy)
    assert bundle.autoencoder is None and bundle.scale_factor == 1.0


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_deepspeed_files_pickling_foreign_code_are_refused_unread(tmp_path, run_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    torch.save({"module": _Payload()}, copy / LATEST / "deepspeed" / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match=r"pickles \['posix.system'\].*refusing"):
        load_ldm(copy, "raw", autoencoder=str(run_dir.parent / "autoencoder"))
    assert not (tmp_path / "PWNED").exists() and not (ROOT / "PWNED").exists()
