"""Loading a frozen autoencoder from our folder, a diffusers folder, a CompVis ckpt / safetensors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.autoencoder.config import AUTOENCODER_PRESETS
from ldm.autoencoder.model import build_autoencoder
from ldm.convert.vae import autoencoder_to_diffusers, diffusers_vae_config
from pipeline.models.autoencoder import (
    config_from_diffusers,
    load_autoencoder,
    save_autoencoder,
    state_dict_sha256,
)

KL, VQ = AUTOENCODER_PRESETS["debug-kl"], AUTOENCODER_PRESETS["debug-vq"]


def _model(cfg):
    torch.manual_seed(0)
    model = build_autoencoder(cfg).eval()
    with torch.no_grad():  # move every weight off its init, so a mis-mapped tensor shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def kl_model():
    return _model(KL)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("cfg", [KL, VQ], ids=["kl", "vq"])
def test_our_folder_round_trips(cfg, images, tmp_path):
    model = _model(cfg)
    folder = save_autoencoder(model, cfg, tmp_path / "ae", scale_factor=0.5, source="unit test")
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "ldm-pipeline/autoencoder" and config["version"] == 1
    assert config["config"]["channel_mult"] == list(cfg.channel_mult) and config["scale_factor"] == 0.5
    loaded, loaded_cfg, identity = load_autoencoder(folder)
    assert loaded_cfg == cfg and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert identity == {"kind": cfg.kind, "config": config["config"], "sha256": state_dict_sha256(model.state_dict()),
                        "source": f"ours:{folder}", "scale_factor": 0.5}
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_moments(images), model.encode_moments(images), rtol=0, atol=0)
    save_autoencoder(_model(cfg), cfg, folder)  # replacing an export leaves one complete folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


def test_sha256_is_stable_and_sensitive(kl_model):
    state_dict = kl_model.state_dict()
    shuffled = dict(reversed(list(state_dict.items())))
    assert state_dict_sha256(shuffled) == state_dict_sha256(state_dict)
    changed = dict(state_dict, **{"quant_conv.bias": state_dict["quant_conv.bias"] + 1e-6})
    assert state_dict_sha256(changed) != state_dict_sha256(state_dict)


def _diffusers_vae(model, cfg):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(diffusers_vae_config(cfg, scaling_factor=0.3))
    vae.load_state_dict(autoencoder_to_diffusers(model.state_dict(), cfg), strict=True)
    return vae.eval()


@pytest.mark.parametrize("layout", ["vae_folder", "pipeline_folder"])
def test_diffusers_folder_loads_with_the_same_weights(kl_model, images, tmp_path, layout):
    vae = _diffusers_vae(kl_model, KL)
    if layout == "vae_folder":
        vae.save_pretrained(tmp_path / "vae")
        spec = tmp_path / "vae"
    else:
        vae.save_pretrained(tmp_path / "pipe" / "vae")
        (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        spec = tmp_path / "pipe"
    loaded, cfg, identity = load_autoencoder(spec)
    assert cfg == KL
    assert identity["sha256"] == state_dict_sha256(kl_model.state_dict())  # same weights, same identity
    assert identity["scale_factor"] == 0.3 and identity["source"].startswith("diffusers:")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_moments(images),
                                   vae.quant_conv(vae.encoder(images)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["debug-kl", "kl-f4", "kl-f8", "kl-f16", "kl-f32"])
def test_config_from_diffusers_inverts_diffusers_vae_config(name):
    cfg = AUTOENCODER_PRESETS[name]
    assert config_from_diffusers(diffusers_vae_config(cfg)) == cfg


def test_unsupported_diffusers_configs_say_why():
    config = diffusers_vae_config(KL) | {"use_quant_conv": False, "shift_factor": 0.1}
    with pytest.raises(ValueError, match="use_quant_conv=False, a shift_factor"):
        config_from_diffusers(config)


def test_compvis_checkpoints_load_with_a_preset(kl_model, tmp_path):
    state_dict = kl_model.state_dict()
    whole_ldm = {f"first_stage_model.{k}": v for k, v in state_dict.items()}
    whole_ldm |= {"model.diffusion_model.out.0.weight": torch.ones(3), "scale_factor": torch.tensor(0.18215)}
    torch.save({"state_dict": whole_ldm, "global_step": 10}, tmp_path / "ldm.ckpt")
    first_stage = dict(state_dict) | {"loss.discriminator.main.0.weight": torch.ones(2)}
    save_file({k: v.contiguous() for k, v in first_stage.items()}, tmp_path / "ae.safetensors")
    for path in (tmp_path / "ldm.ckpt", tmp_path / "ae.safetensors"):
        _, cfg, identity = load_autoencoder(path, preset="debug-kl")
        assert cfg == KL and identity["sha256"] == state_dict_sha256(state_dict)
        assert identity["source"] == f"compvis:{path}:debug-kl" and identity["scale_factor"] is None


def test_bad_sources_name_the_path_and_what_was_expected(kl_model, tmp_path):
    save_file({k: v.contiguous() for k, v in kl_model.state_dict().items()}, tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match=r"ae.safetensors is a CompVis checkpoint.*set the autoencoder preset"):
        load_autoencoder(tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match=r"autoencoder .*ae.safetensors \(preset debug-vq\): the state dict does "
                                         r"not fit"):
        load_autoencoder(tmp_path / "ae.safetensors", preset="debug-vq")
    with pytest.raises(ValueError, match=r"no autoencoder at '.*missing.ckpt': the path does not exist. Expected "
                                         r"our autoencoder folder"):
        load_autoencoder(tmp_path / "missing.ckpt", preset="debug-kl")
    with pytest.raises(ValueError, match=r"has no config.json; expected our autoencoder folder"):
        load_autoencoder(tmp_path)
    torch.save({"state_dict": {"first_stage_model.x": object()}}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights-only"):
        load_autoencoder(tmp_path / "pickled.ckpt", preset="debug-kl")
    save_file({"model.diffusion_model.w": torch.ones(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="holds no autoencoder weights"):
        load_autoencoder(tmp_path / "unet.safetensors", preset="debug-kl")


def test_an_uncached_hub_id_fails_offline_with_a_clear_error():
    with pytest.raises(ValueError, match=r"could not load a diffusers AutoencoderKL from 'nobody/no-such-vae'.*"
                                         r"offline, a hub id works only when it is in the local cache"):
        load_autoencoder("nobody/no-such-vae")
