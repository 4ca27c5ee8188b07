"""Our KL autoencoder (CompVis `taming`/`ldm` layout) <-> diffusers `AutoencoderKL`.

Pure functions of configs and state dicts; diffusers is never imported here.
Two differences beyond names: diffusers indexes decoder levels from the lowest resolution
(`up_blocks.0`) where CompVis indexes from the highest (`up.0`), and diffusers' attention
projections are Linear [C, C] where CompVis stores 1x1 convs [C, C, 1, 1]. The VQ models
(Sec. 3.1) have no diffusers counterpart we convert to: export them in our own format.
"""
import torch

from ldm.autoencoder.config import NUM_GROUPS, AutoencoderConfig
from ldm.autoencoder.model import AutoencoderKL

# Leaf renames inside a residual block and inside an attention block (CompVis -> diffusers).
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def check_diffusers_vae(cfg: AutoencoderConfig) -> None:
    """Raise ValueError unless diffusers' `AutoencoderKL` can hold this autoencoder exactly."""
    if cfg.kind != "kl":
        raise ValueError(f"autoencoder kind {cfg.kind!r}: only KL autoencoders convert to diffusers' "
                         "AutoencoderKL; export VQ models in our own safetensors format")
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError(f"embed_dim={cfg.embed_dim} != z_channels={cfg.z_channels}: diffusers' quant_conv "
                         "keeps latent_channels, so only embed_dim == z_channels converts")
    if cfg.channel_mult[0] != 1:
        raise ValueError(f"channel_mult={cfg.channel_mult} starts at {cfg.channel_mult[0]}: diffusers' "
                         "conv_in writes block_out_channels[0] channels, so only channel_mult[0] == 1 converts")


def _level_attention(cfg: AutoencoderConfig) -> list[bool]:
    """Whether each level (0 = full resolution) has attention after its residual blocks."""
    return [cfg.resolution // 2 ** i in cfg.attn_resolutions for i in range(len(cfg.channel_mult))]


def _block_prefixes(cfg: AutoencoderConfig) -> dict[str, str]:
    """CompVis module prefix -> diffusers module prefix, for every block of encoder and decoder."""
    num_levels = len(cfg.channel_mult)
    out = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        out |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                f"{part}.norm_out": f"{part}.conv_norm_out", f"{part}.mid.block_1": f"{part}.mid_block.resnets.0",
                f"{part}.mid.attn_1": f"{part}.mid_block.attentions.0",
                f"{part}.mid.block_2": f"{part}.mid_block.resnets.1"}
    for i in range(num_levels):
        for j in range(cfg.num_res_blocks):
            out[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            out[f"encoder.down.{i}.attn.{j}"] = f"encoder.down_blocks.{i}.attentions.{j}"
        out[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        up = num_levels - 1 - i  # diffusers runs the decoder from the lowest resolution
        for j in range(cfg.num_res_blocks + 1):
            out[f"decoder.up.{i}.block.{j}"] = f"decoder.up_blocks.{up}.resnets.{j}"
            out[f"decoder.up.{i}.attn.{j}"] = f"decoder.up_blocks.{up}.attentions.{j}"
        out[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return out


def _rename_leaf(diffusers_prefix: str, rest: str) -> str:
    """`rest` is the parameter path below a block (`q.weight`, `nin_shortcut.bias`, or just `weight`)."""
    param_path, _, leaf = rest.rpartition(".")
    if ".resnets." in diffusers_prefix:
        param_path = _RESNET.get(param_path, param_path)
    elif ".attentions." in diffusers_prefix:
        param_path = _ATTENTION[param_path]
    return f"{param_path}.{leaf}" if param_path else leaf


def _diffusers_key(key: str, prefixes: dict[str, str]) -> str:
    prefix = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        raise ValueError(f"no diffusers name for autoencoder parameter {key!r}; is `cfg` the config "
                         "this state dict was trained with?")
    return f"{prefixes[prefix]}.{_rename_leaf(prefixes[prefix], key[len(prefix) + 1:])}"


def autoencoder_to_diffusers(state_dict: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """Rename (and reshape 1x1-conv attention weights of) a KL autoencoder state dict to `AutoencoderKL` keys."""
    check_diffusers_vae(cfg)
    prefixes = _block_prefixes(cfg)
    converted = {}
    for key, tensor in state_dict.items():
        new_key = _diffusers_key(key, prefixes)
        if ".attentions." in new_key and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[:2])  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        converted[new_key] = tensor
    return converted


def autoencoder_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """The inverse of `autoencoder_to_diffusers`: `AutoencoderKL` keys -> our (CompVis) layout."""
    check_diffusers_vae(cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL(cfg).state_dict().items()}
    prefixes = _block_prefixes(cfg)
    inverse = {_diffusers_key(k, prefixes): k for k in shapes}  # diffusers key -> our key
    unknown = sorted(set(state_dict) - set(inverse))
    if unknown:
        raise ValueError(f"{len(unknown)} diffusers autoencoder keys have no counterpart in this config, "
                         f"e.g. {unknown[:5]}; build `cfg` to match the diffusers model's config")
    # reshape restores the 1x1-conv attention weights and leaves every other tensor as it is.
    return {inverse[k]: v.reshape(shapes[inverse[k]]) for k, v in state_dict.items()}


def diffusers_vae_config(cfg: AutoencoderConfig, scaling_factor: float = 1.0) -> dict:
    """`AutoencoderKL.from_config` arguments for the autoencoder `cfg` builds.

    `scaling_factor` is the latent scale of App. G that the diffusion model was trained with
    (the preset's `scale_factor`, or the 1/std estimated for the trained model).
    """
    check_diffusers_vae(cfg)
    has_attn = _level_attention(cfg)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(has_attn)],
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks, "latent_channels": cfg.z_channels,
        "norm_num_groups": NUM_GROUPS, "act_fn": "silu", "sample_size": cfg.resolution,
        "mid_block_add_attention": cfg.mid_attention, "scaling_factor": scaling_factor,
        "use_quant_conv": True, "use_post_quant_conv": True,
    }
