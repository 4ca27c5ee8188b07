import dataclasses

import pytest
import torch

from ldm.diffusion.conditioners import TextTransformer
from ldm.diffusion.layout import LayoutTokenizer
from ldm.diffusion.unet import UNetConfig
from ldm.presets import (
    PRESETS,
    ConditionerConfig,
    LDMPreset,
    build,
    trainable_num_params,
)

# The paper's counts that the issue holds us to (within 3%). The others in PRESETS are checked
# against the figures measured with diffusers' equivalent blocks (shared/PAPER_CONFIGS.md).
PAPER_COUNTS = {
    "ldm-kl8-t2i-1.45b": 1.45e9,
    "ldm-vq4-celebahq": 274e6,
    "ldm-kl8-churches": 294e6,
    "ldm-vq4-cin": 395e6,
    "ldm-vq4-inpainting": 215e6,
    "ldm-vq4-sr": 169e6,
}


def _count(name: str) -> int:
    with torch.device("meta"):
        return trainable_num_params(name, build(name))


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts_within_3_percent(name):
    assert PRESETS[name].paper_num_params == PAPER_COUNTS[name]
    count = _count(name)
    assert abs(count / PAPER_COUNTS[name] - 1) <= 0.03, f"{name}: {count / 1e6:.1f}M"


def test_t2i_parts_match_the_released_model():
    with torch.device("meta"):
        modules = build("ldm-kl8-t2i-1.45b")
    unet = sum(p.numel() for p in modules.unet.parameters())
    text = sum(p.numel() for p in modules.conditioner.parameters())
    assert unet == 872_300_484            # = diffusers' UNet2DConditionModel with the same blocks
    assert round(text / 1e6, 1) == 542.9  # 32 x 1280 transformer, no unused vocabulary projection


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("ldm-")])
def test_every_paper_preset_builds_on_meta_and_is_near_its_paper_count(name):
    preset = PRESETS[name]
    assert preset.paper_num_params, f"{name} lacks the paper's count"
    # The layout and semantic rows have no released config to check against; allow 10% there.
    # COCO's LDM-8 (Tab. 15: 345M) counts 367M here: its heads and attention placement are not released either.
    loose = ("ldm-vq4-layout-openimages", "ldm-vq8-layout-coco", "ldm-vq4-semantic", "ldm-vq4-inpainting-big")
    tolerance = 0.10 if name in loose else 0.03
    assert abs(_count(name) / preset.paper_num_params - 1) <= tolerance


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("debug-")])
def test_debug_presets_run_end_to_end(name):
    """Image -> latent -> UNet -> latent -> image on real (CPU) tensors, at debug size."""
    preset = PRESETS[name]
    ae, unet, cond = build(name)
    side = preset.latent_size * ae.cfg.downsample_factor
    with torch.no_grad():
        z = ae.latent_from_moments(ae.encode_moments(torch.randn(2, 3, side, side)))
    assert z.shape == (2, unet.cfg.out_channels, preset.latent_size, preset.latent_size)
    x, context = z, None
    if preset.conditioner.kind == "concat":
        x = torch.cat([z, torch.randn(2, preset.conditioner.concat_channels, *z.shape[-2:])], dim=1)
    elif preset.conditioner.kind == "rescaler":  # a one-hot map at image size, rescaled to the latent grid
        ids = torch.randint(0, preset.conditioner.rescaler_in_channels, (2, side, side))
        one_hot = torch.nn.functional.one_hot(ids, preset.conditioner.rescaler_in_channels).permute(0, 3, 1, 2)
        x = torch.cat([z, cond(one_hot.float())], dim=1)
    elif cond is not None:
        context = cond(cond.null_condition(2))
    eps = unet(x, torch.tensor([1, 500]), context)
    assert eps.shape == z.shape
    assert ae.decode(eps.detach()).shape == (2, 3, side, side)
    assert sum(p.numel() for p in unet.parameters()) < 3e6


def test_preset_consistency_errors_name_the_field():
    good = PRESETS["debug-t2i"]
    with pytest.raises(ValueError, match="unet.in_channels=5 must equal the latent channels 4"):
        dataclasses.replace(good, unet=dataclasses.replace(good.unet, in_channels=5))
    with pytest.raises(ValueError, match="unet.context_dim=None must equal the conditioner's output width 64"):
        dataclasses.replace(good, unet=dataclasses.replace(good.unet, context_dim=None))
    with pytest.raises(ValueError, match="autoencoder='kl-f3'"):
        dataclasses.replace(good, autoencoder="kl-f3")
    with pytest.raises(ValueError, match="conditioner.kind='clip'"):
        ConditionerConfig("clip")
    with pytest.raises(ValueError, match="unknown preset 'ldm-huge'"):
        build("ldm-huge")


def test_every_family_has_a_debug_preset():
    kinds = {PRESETS[n].conditioner.kind for n in PRESETS if n.startswith("debug-")}
    assert {"text", "layout", "class", "concat", "none"} <= kinds


@pytest.mark.parametrize("name", [n for n in PRESETS if PRESETS[n].conditioner.kind == "layout"])
def test_a_layout_presets_empty_condition_is_the_tokenizers_empty_layout(name):
    """Guidance dropout and the unconditional branch read the layout without boxes (30 pad slots, full crop),
    in the vocabulary the preset embeds."""
    text = PRESETS[name].conditioner.text
    with torch.device("meta"):
        vocab = build(name).conditioner.token_embedding.num_embeddings
    tokens, _ = LayoutTokenizer(3, num_tokens=text.vocab_size).encode([])
    assert vocab == text.vocab_size and text.max_length == tokens.numel() == 92
    assert torch.equal(TextTransformer(dataclasses.replace(text, depth=0, width=8)).null_condition(2),
                       tokens.expand(2, -1))
    assert isinstance(PRESETS["debug-t2i"], LDMPreset) and isinstance(PRESETS["debug-t2i"].unet, UNetConfig)
