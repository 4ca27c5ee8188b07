"""Weight conversion and numerical parity with diffusers and the CompVis layout.

Peer implementations: diffusers' `UNet2DConditionModel`, `AutoencoderKL` and `DDIMScheduler`,
and diffusers' own CompVis-checkpoint converters (`loaders.single_file_utils`), an independent
reading of the CompVis layout. All fp32 on the CPU with tiny models.
"""
import dataclasses
import random

import pytest
import torch
from factories import assert_float32_close

from ldm.autoencoder.config import AUTOENCODER_PRESETS, AutoencoderConfig
from ldm.autoencoder.model import AutoencoderKL, build_autoencoder
from ldm.convert.bert import (
    text_transformer_from_xtransformers,
    text_transformer_to_xtransformers,
)
from ldm.convert.compvis import (
    compvis_ema_to_unet,
    first_stage_weights,
    join_compvis_state_dict,
    load_into,
    split_compvis_state_dict,
    unet_to_compvis_ema,
)
from ldm.convert.diffusers import diffusers_export_parts, diffusers_scheduler_config
from ldm.convert.unet import (
    diffusers_unet_config,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldm.convert.vae import (
    autoencoder_from_diffusers,
    autoencoder_to_diffusers,
    diffusers_vae_config,
)
from ldm.diffusion.conditioners import TextTransformer, TextTransformerConfig
from ldm.diffusion.samplers import sample_ddim, timesteps
from ldm.diffusion.schedules import NoiseSchedule, ScheduleConfig
from ldm.diffusion.unet import UNet, UNetConfig
from ldm.presets import PRESETS, build_conditioner

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


CROSS = UNetConfig(4, 4, 32, (1, 2, 2), 1, (2, 4), num_head_channels=16, context_dim=24, transformer_depth=2)
SELF_FILM = UNetConfig(3, 3, 32, (1, 2), 1, (1, 2), num_heads=2, use_scale_shift_norm=True, resblock_updown=True)


def _random_unet_config(seed: int) -> tuple[UNetConfig, tuple[int, int]]:
    """An SD-style UNet drawn from `seed` and a non-square latent size it accepts."""
    rng = random.Random(seed)
    num_levels = rng.randint(2, 3)
    # Heads alternate between a count and channels per head, so both forms are always covered.
    heads = {"num_heads": rng.choice([1, 2, 4])} if seed % 2 == 0 else {"num_head_channels": rng.choice([8, 16, 32])}
    cfg = UNetConfig(
        in_channels=rng.randint(1, 8), out_channels=rng.randint(1, 8), model_channels=32,
        channel_mult=(1, *(rng.randint(1, 3) for _ in range(num_levels - 1))), num_res_blocks=rng.randint(1, 2),
        attention_ds=tuple(2 ** i for i in range(num_levels) if rng.random() < 0.6),
        context_dim=rng.choice([8, 24, 40]), transformer_depth=rng.randint(1, 2), **heads)
    f = cfg.downsample_factor
    height = f * rng.randint(1, 3)
    return cfg, (height, height + f * rng.randint(1, 2))


UNET_CASES = {
    "debug-t2i": (PRESETS["debug-t2i"].unet, (16, 8)),
    "debug-cin": (PRESETS["debug-cin"].unet, (8, 12)),
    "cross-depth2": (CROSS, (16, 24)),
    "random-0": _random_unet_config(0),
    "random-1": _random_unet_config(1),
    "random-2": _random_unet_config(2),
}
VAE_CASES = {
    "debug-kl": (AUTOENCODER_PRESETS["debug-kl"], (32, 48)),
    # Two blocks per level, attention at two levels, no middle attention, embed_dim == z_channels.
    "attn-no-mid": (AutoencoderConfig("kl", (1, 2), 3, 3, base_channels=32, num_res_blocks=2,
                                      attn_resolutions=(16, 8), mid_attention=False, resolution=16), (16, 8)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init (zero-initialised output layers included), so each path shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module.eval()


def _diffusers_unet(cfg: UNetConfig, ours: UNet, sample_size) -> torch.nn.Module:
    peer = diffusers.UNet2DConditionModel.from_config(diffusers_unet_config(cfg, sample_size))
    load_into(peer, unet_to_diffusers(ours.state_dict(), cfg), "diffusers UNet")
    return peer.eval()


def _assert_same_state(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], v) for k, v in expected.items())


# --------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("name", UNET_CASES)
def test_unet_matches_diffusers_and_round_trips(name):
    cfg, hw = UNET_CASES[name]
    ours = _perturbed(UNet(cfg))
    peer = _diffusers_unet(cfg, ours, hw)
    x, t, c = torch.randn(2, cfg.in_channels, *hw), torch.tensor([3, 917]), torch.randn(2, 5, cfg.context_dim)
    with torch.no_grad():
        expected, actual = ours(x, t, c), peer(x, t, encoder_hidden_states=c).sample
    assert expected.abs().max() > 0.1  # perturbed weights: a real signal, not zeros
    assert_float32_close(actual, expected)
    _assert_same_state(unet_from_diffusers(peer.state_dict(), cfg), ours.state_dict())


@pytest.mark.parametrize("name", ["debug-t2i", "cross-depth2", "random-2"])
def test_unet_layout_agrees_with_diffusers_own_compvis_converter(name):
    """diffusers reads a CompVis checkpoint of our UNet (and its LitEma copy) exactly as we convert it."""
    cfg, hw = UNET_CASES[name]
    unet, ema = _perturbed(UNet(cfg)).state_dict(), _perturbed(UNet(cfg)).state_dict()
    ckpt = join_compvis_state_dict({"unet": unet, "ema": unet_to_compvis_ema(ema)})
    config = diffusers_unet_config(cfg, hw)
    for extract_ema, weights in ((False, unet), (True, ema)):
        theirs = single_file_utils.convert_ldm_unet_checkpoint(ckpt, config, extract_ema=extract_ema)
        _assert_same_state(theirs, unet_to_diffusers(weights, cfg))


@pytest.mark.parametrize("cfg, match", [
    (SELF_FILM, "SD-style"),
    (UNetConfig(4, 4, 32, (1, 2), 1, (1,), num_heads=2), "SD-style"),  # self-attention only
    (UNetConfig(4, 4, 32, (2, 2), 1, (1,), num_heads=2, context_dim=8), r"channel_mult\[0\] == 1"),
])
def test_unets_without_diffusers_layout_say_so(cfg, match):
    with pytest.raises(ValueError, match=match):
        unet_to_diffusers(UNet(cfg).state_dict(), cfg)
    with pytest.raises(ValueError, match=match):
        diffusers_unet_config(cfg, 16)


def test_unet_from_diffusers_rejects_keys_of_another_config():
    cfg = PRESETS["debug-t2i"].unet
    peer_sd = unet_to_diffusers(UNet(cfg).state_dict(), cfg) | {"down_blocks.7.resnets.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="1 diffusers UNet keys have no counterpart"):
        unet_from_diffusers(peer_sd, cfg)


# -------------------------------------------------------------------------------------- autoencoder


@pytest.mark.parametrize("name", VAE_CASES)
def test_autoencoder_matches_diffusers_and_round_trips(name):
    cfg, hw = VAE_CASES[name]
    ours = _perturbed(AutoencoderKL(cfg), std=0.02)
    peer = diffusers.AutoencoderKL.from_config(diffusers_vae_config(cfg)).eval()
    load_into(peer, autoencoder_to_diffusers(ours.state_dict(), cfg), "diffusers AutoencoderKL")
    x = torch.randn(2, cfg.in_channels, *hw)
    z = torch.randn(2, cfg.embed_dim, hw[0] // cfg.downsample_factor, hw[1] // cfg.downsample_factor)
    with torch.no_grad():
        moments, peer_moments = ours.encode_moments(x), peer.encode(x).latent_dist.parameters
        x_rec, peer_x_rec = ours.decode(z), peer.decode(z).sample
    assert_float32_close(peer_moments, moments)
    assert_float32_close(peer_x_rec, x_rec)
    _assert_same_state(autoencoder_from_diffusers(peer.state_dict(), cfg), ours.state_dict())


def test_autoencoder_layout_agrees_with_diffusers_own_compvis_converter():
    # diffusers' single-file converter knows SD-style VAEs only (attention in the middle block,
    # none inside levels); attention inside levels is covered by the parity test above.
    cfg = dataclasses.replace(AUTOENCODER_PRESETS["debug-kl"], attn_resolutions=())
    ours = _perturbed(AutoencoderKL(cfg)).state_dict()
    ckpt = join_compvis_state_dict({"autoencoder": ours})
    theirs = single_file_utils.convert_ldm_vae_checkpoint(ckpt, diffusers_vae_config(cfg))
    _assert_same_state(theirs, autoencoder_to_diffusers(ours, cfg))


@pytest.mark.parametrize("cfg, match", [
    (AUTOENCODER_PRESETS["debug-vq"], "only KL autoencoders"),
    (AutoencoderConfig("kl", (1, 2), 4, 3, base_channels=32, resolution=16), "embed_dim=3 != z_channels=4"),
    (AutoencoderConfig("kl", (2, 2), 4, 4, base_channels=32, resolution=16), r"channel_mult\[0\] == 1"),
])
def test_autoencoders_without_diffusers_layout_say_so(cfg, match):
    with pytest.raises(ValueError, match=match):
        diffusers_vae_config(cfg)
    with pytest.raises(ValueError, match=match):
        autoencoder_to_diffusers({}, cfg)


# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_scheduler_config_reproduces_our_schedule_and_timesteps(kind):
    cfg = ScheduleConfig(kind=kind, beta_start=0.0015, beta_end=0.0195)
    scheduler = diffusers.DDIMScheduler.from_config(diffusers_scheduler_config(cfg))
    ours = NoiseSchedule.from_config(cfg)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours.alpha_bar, rtol=1e-5, atol=1e-6)
    for num_steps in (1, 10, 20, 50, 1000):
        scheduler.set_timesteps(num_steps)
        assert torch.equal(scheduler.timesteps, timesteps(ours, num_steps))


def test_ddim_matches_diffusers_scheduler_driving_the_converted_unet():
    preset = PRESETS["debug-t2i"]
    ours = _perturbed(UNet(preset.unet))
    peer = _diffusers_unet(preset.unet, ours, preset.latent_size)
    x_T = torch.randn(2, 4, preset.latent_size, preset.latent_size)
    context = torch.randn(2, 7, preset.unet.context_dim)
    latents = sample_ddim(lambda x, t: ours(x, t, context), x_T, NoiseSchedule.from_config(preset.schedule),
                          num_steps=10)
    scheduler = diffusers.DDIMScheduler.from_config(diffusers_scheduler_config(preset.schedule))
    scheduler.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = peer(x, t, encoder_hidden_states=context).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    assert_float32_close(x, latents)
    assert not torch.allclose(latents, x_T, atol=0.1)  # the sampler moved the latents


# ------------------------------------------------------------------------------------ CompVis layout


@pytest.mark.parametrize("preset_name", ["debug-t2i", "debug-cin", "debug-uncond"])
def test_compvis_checkpoint_round_trip_is_exact(preset_name):
    """ours -> one CompVis-layout state dict -> split -> loaded into fresh modules: the same tensors."""
    preset = PRESETS[preset_name]
    fresh = {"autoencoder": lambda: build_autoencoder(AUTOENCODER_PRESETS[preset.autoencoder]),
             "unet": lambda: UNet(preset.unet), "ema": lambda: UNet(preset.unet)}
    if preset.conditioner.kind != "none":
        fresh["conditioner"] = lambda: build_conditioner(preset.conditioner)
    trained = {name: _perturbed(build()).state_dict() for name, build in fresh.items()}
    other = {"scale_factor": torch.tensor(0.18215), "betas": torch.rand(1000)}
    ckpt = join_compvis_state_dict(trained | {"ema": unet_to_compvis_ema(trained["ema"]), "other": other})
    assert "model_ema.diffusion_modelinput_blocks00weight" in ckpt
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in ckpt
    assert "model.diffusion_model.middle_block.1.norm.weight" in ckpt
    parts = split_compvis_state_dict(ckpt | {"model_ema.decay": torch.tensor(0.9999),
                                             "model_ema.num_updates": torch.tensor(7)})
    parts["ema"] = compvis_ema_to_unet(parts["ema"], preset.unet)
    _assert_same_state(parts.pop("other"), other)
    assert parts["conditioner"].keys() == trained.get("conditioner", {}).keys()  # empty when unconditional
    for name, build in fresh.items():
        module = build()
        load_into(module, parts[name], name)
        _assert_same_state(module.state_dict(), trained[name])


def test_split_gives_every_part_and_join_rejects_unknown_parts():
    assert split_compvis_state_dict({}) == {"autoencoder": {}, "unet": {}, "conditioner": {}, "ema": {}, "other": {}}
    with pytest.raises(ValueError, match="unknown checkpoint parts"):
        join_compvis_state_dict({"vae": {}})


def test_first_stage_checkpoint_drops_the_training_loss():
    cfg = AUTOENCODER_PRESETS["debug-kl"]
    ours = AutoencoderKL(cfg).state_dict()
    ckpt = ours | {"loss.discriminator.main.0.weight": torch.zeros(1), "loss.logvar": torch.zeros(())}
    load_into(AutoencoderKL(cfg), first_stage_weights(ckpt), "first stage")


def test_load_into_lists_what_does_not_fit():
    cfg = PRESETS["debug-t2i"].unet
    sd = UNet(cfg).state_dict()
    missing = sorted(sd)[:12]
    broken = {k: v for k, v in sd.items() if k not in missing} | {"model_ema.decay": torch.zeros(())}
    broken["out.2.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        load_into(UNet(cfg), broken, "UNet of debug-t2i")
    message = str(info.value)
    assert message.startswith("UNet of debug-t2i: ") and "12 missing, 1 unexpected, 1 with another shape" in message
    assert missing[0] in message and missing[9] in message and missing[10] not in message
    assert "... and 2 more" in message and "'model_ema.decay'" in message
    assert "out.2.bias: (3,) vs (4,)" in message


def test_ema_names_that_match_no_unet_key_are_reported():
    cfg = PRESETS["debug-t2i"].unet
    ema = unet_to_compvis_ema(UNet(cfg).state_dict()) | {"diffusion_modelbogus0weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="diffusion_modelbogus0weight"):
        load_into(UNet(cfg), compvis_ema_to_unet(ema, cfg), "EMA UNet")


# ------------------------------------------------------------------------------------ diffusers export


def test_diffusers_folder_export_loads_back_with_from_pretrained(tmp_path):
    preset = PRESETS["debug-t2i"]
    unet, ae = _perturbed(UNet(preset.unet)), _perturbed(AutoencoderKL(AUTOENCODER_PRESETS[preset.autoencoder]))
    parts = diffusers_export_parts(unet, ae, preset.schedule, latent_size=preset.latent_size, scaling_factor=0.5)
    classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
               "scheduler": diffusers.DDIMScheduler}
    exported = {}
    for name, (config, state_dict) in parts.items():  # what the export job does
        exported[name] = classes[name].from_config(config)
        if state_dict is not None:
            load_into(exported[name], state_dict, f"diffusers {name}")
        exported[name].save_pretrained(tmp_path / name)
    assert {p.name for p in (tmp_path / "unet").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = {name: cls.from_pretrained(tmp_path, subfolder=name) for name, cls in classes.items()}
    assert loaded["vae"].config.scaling_factor == 0.5 and loaded["scheduler"].config.timestep_spacing == "trailing"
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 3, preset.unet.context_dim)
    with torch.no_grad():
        unet_out = [m.eval()(x, t, encoder_hidden_states=c).sample for m in (loaded["unet"], exported["unet"])]
        vae_out = [m.eval().decode(x).sample for m in (loaded["vae"], exported["vae"])]
        assert torch.equal(*unet_out) and torch.equal(*vae_out)
        assert_float32_close(unet_out[0], unet(x, t, c))
        assert_float32_close(vae_out[0], ae.decode(x))


def test_export_refuses_vq_first_stages():
    preset = PRESETS["debug-uncond"]
    vq = build_autoencoder(AUTOENCODER_PRESETS[preset.autoencoder])
    with pytest.raises(ValueError, match="VQModel has no diffusers counterpart"):
        diffusers_export_parts(UNet(PRESETS["debug-t2i"].unet), vq, preset.schedule,
                               latent_size=16, scaling_factor=1.0)


# ------------------------------------------------------------------------- the released text encoder


def _xtransformers_state_dict(cfg: TextTransformerConfig) -> dict[str, torch.Tensor]:
    """Random weights under the names of the released txt2img-f8 `cond_stage_model.transformer.*`
    (CompVis' vendored x-transformers: TransformerWrapper(Encoder(dim, depth)), dim_head 64 by default)."""
    width, inner, hidden = cfg.width, cfg.num_heads * cfg.head_dim, cfg.width * cfg.mlp_ratio
    shapes = {"token_emb.weight": (cfg.vocab_size, width), "pos_emb.emb.weight": (cfg.max_length, width),
              "norm.weight": (width,), "norm.bias": (width,), "to_logits.weight": (cfg.vocab_size, width),
              "to_logits.bias": (cfg.vocab_size,)}
    for i in range(cfg.depth):
        attn, ff = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        shapes |= {f"{attn}.0.weight": (width,), f"{attn}.0.bias": (width,), f"{attn}.1.to_q.weight": (inner, width),
                   f"{attn}.1.to_k.weight": (inner, width), f"{attn}.1.to_v.weight": (inner, width),
                   f"{attn}.1.to_out.weight": (width, inner), f"{attn}.1.to_out.bias": (width,),
                   f"{ff}.0.weight": (width,), f"{ff}.0.bias": (width,), f"{ff}.1.net.0.0.weight": (hidden, width),
                   f"{ff}.1.net.0.0.bias": (hidden,), f"{ff}.1.net.2.weight": (width, hidden),
                   f"{ff}.1.net.2.bias": (width,)}
    return {k: 0.2 * torch.randn(shape) + (1.0 if k.endswith(".0.weight") or k == "norm.weight" else 0.0)
            for k, shape in shapes.items()}


def _xtransformers_forward(sd: dict, tokens_BL: torch.Tensor, cfg: TextTransformerConfig) -> torch.Tensor:
    """The released encoder's computation, written out from its module structure: pre-LN residual blocks
    of softmax(q k^T / sqrt(d_head)) v and Linear-GELU-Linear, learned positions, a final LayerNorm."""
    import torch.nn.functional as F
    from einops import rearrange

    def norm(x, prefix):
        return F.layer_norm(x, (cfg.width,), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    x = F.embedding(tokens_BL, sd["token_emb.weight"]) + sd["pos_emb.emb.weight"][: tokens_BL.shape[1]]
    for i in range(cfg.depth):
        attn, ff = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        h = norm(x, f"{attn}.0")
        q, k, v = (rearrange(h @ sd[f"{attn}.1.to_{n}.weight"].T, "b l (h d) -> b h l d", h=cfg.num_heads)
                   for n in "qkv")
        weights = (q @ k.transpose(-1, -2) * cfg.head_dim ** -0.5).softmax(-1)
        x = x + F.linear(rearrange(weights @ v, "b h l d -> b l (h d)"), sd[f"{attn}.1.to_out.weight"],
                         sd[f"{attn}.1.to_out.bias"])
        h = F.gelu(F.linear(norm(x, f"{ff}.0"), sd[f"{ff}.1.net.0.0.weight"], sd[f"{ff}.1.net.0.0.bias"]))
        x = x + F.linear(h, sd[f"{ff}.1.net.2.weight"], sd[f"{ff}.1.net.2.bias"])
    return norm(x, "norm")


SMALL_BERT = TextTransformerConfig(vocab_size=200, max_length=12, width=32, depth=2, num_heads=4, head_dim=8)


def test_released_text_encoder_weights_load_into_our_text_transformer_with_parity():
    theirs = _xtransformers_state_dict(SMALL_BERT)
    ours = TextTransformer(SMALL_BERT).eval()
    load_into(ours, text_transformer_from_xtransformers(theirs, SMALL_BERT), "text transformer")
    tokens = torch.randint(0, SMALL_BERT.vocab_size, (3, 10))
    with torch.no_grad():
        assert_float32_close(ours(tokens), _xtransformers_forward(theirs, tokens, SMALL_BERT))
    back = text_transformer_to_xtransformers(ours.state_dict(), SMALL_BERT)
    _assert_same_state(back, {k: v for k, v in theirs.items() if not k.startswith("to_logits.")})


def test_text_encoder_names_of_the_1p45b_model_and_what_does_not_fit():
    with torch.device("meta"):
        ours = TextTransformer(PRESETS["ldm-kl8-t2i-1.45b"].conditioner.text).state_dict()
    names = text_transformer_to_xtransformers(ours, PRESETS["ldm-kl8-t2i-1.45b"].conditioner.text)
    assert len(names) == 4 + 32 * (7 + 6)  # per block: LN, q, k, v, out (w, b); LN, 2 Linear; as released
    assert {"token_emb.weight", "pos_emb.emb.weight", "attn_layers.layers.63.1.net.2.bias"} <= set(names)
    assert names["attn_layers.layers.62.1.to_v.weight"].shape == (512, 1280)  # 8 heads x 64
    deeper = _xtransformers_state_dict(dataclasses.replace(SMALL_BERT, depth=3))
    with pytest.raises(ValueError, match=r"attn_layers\.layers\.4\.0\.bias"):
        load_into(TextTransformer(SMALL_BERT), text_transformer_from_xtransformers(deeper, SMALL_BERT), "BERT")
