"""Weight layouts: our UNet uses the CompVis checkpoint layout; this maps it to diffusers'.

Pure functions of state dicts (no file I/O): jobs/ reads and writes the files.
Covers SD-style cross-attention UNets (SpatialTransformer attention), the layout diffusers'
`UNet2DConditionModel` has; self-attention-only UNets have no diffusers equivalent here.
"""
import torch

from ldm.unet import UNet, UNetConfig

# ResBlock (CompVis) -> ResnetBlock2D (diffusers), by parameter path inside the block.
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _block_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """CompVis module prefix -> diffusers module prefix, for every block of the UNet."""
    n = cfg.num_res_blocks
    has_attn = [2 ** level in cfg.attention_ds for level in range(len(cfg.channel_mult))]
    out = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
           "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
           "middle_block.2": "mid_block.resnets.1"}
    for i, attn in enumerate(has_attn):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            out[f"input_blocks.{k}.0"] = f"down_blocks.{i}.resnets.{j}"
            if attn:
                out[f"input_blocks.{k}.1"] = f"down_blocks.{i}.attentions.{j}"
        out[f"input_blocks.{1 + i * (n + 1) + n}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    for i, attn in enumerate(reversed(has_attn)):
        for j in range(n + 1):
            k = i * (n + 1) + j
            out[f"output_blocks.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
            if attn:
                out[f"output_blocks.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
        out[f"output_blocks.{i * (n + 1) + n}.{2 if attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return out


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a CompVis-layout UNet state dict to `UNet2DConditionModel` keys (same tensors)."""
    if cfg.context_dim is None or cfg.resblock_updown or cfg.use_scale_shift_norm:
        raise ValueError("only SD-style UNets (cross-attention, conv up/downsampling, additive time "
                         "embedding) have a diffusers UNet2DConditionModel layout")
    prefixes = _block_prefixes(cfg)
    converted = {}
    for key, tensor in state_dict.items():
        prefix = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise ValueError(f"no diffusers name for UNet parameter {key!r}")
        rest = key[len(prefix) + 1:]
        if ".resnets." in prefixes[prefix]:
            param_path, _, leaf = rest.rpartition(".")
            rest = f"{_RESNET[param_path]}.{leaf}"
        converted[f"{prefixes[prefix]}.{rest}"] = tensor
    return converted


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """The inverse of `unet_to_diffusers`: diffusers `UNet2DConditionModel` keys -> our layout."""
    inverse = unet_to_diffusers({k: k for k in _ours_keys(cfg)}, cfg)  # diffusers key -> our key
    unknown = sorted(set(state_dict) - set(inverse))
    if unknown:
        raise ValueError(f"diffusers UNet keys with no counterpart in this config: {unknown[:5]} ...")
    return {inverse[k]: v for k, v in state_dict.items()}


def _ours_keys(cfg: UNetConfig) -> list[str]:

    with torch.device("meta"):
        return list(UNet(cfg).state_dict())
