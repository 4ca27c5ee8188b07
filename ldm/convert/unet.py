"""Our UNet (CompVis `openaimodel` layout) <-> diffusers `UNet2DConditionModel`.

Pure functions of configs and state dicts; diffusers is never imported here.
Only SD-style UNets have a diffusers layout: SpatialTransformer cross-attention (Sec. 3.3),
additive time embedding, conv up/downsampling and `channel_mult[0] == 1` (diffusers' `conv_in`
writes `block_out_channels[0]` channels, ours `model_channels`). The paper's self-attention-only
and scale-shift / ResBlock-updown UNets (App. E.2.1, e.g. ldm-kl8-churches) are exported in our
own format instead.
"""
import torch

from ldm.diffusion.unet import UNet, UNetConfig

# ResBlock (CompVis) -> ResnetBlock2D (diffusers), by parameter path inside the block.
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def check_diffusers_unet(cfg: UNetConfig) -> None:
    """Raise ValueError unless `UNet2DConditionModel` can hold this UNet exactly."""
    if cfg.context_dim is None or cfg.resblock_updown or cfg.use_scale_shift_norm:
        raise ValueError("only SD-style UNets (cross-attention, conv up/downsampling, additive time "
                         "embedding) have a diffusers UNet2DConditionModel layout; export this one "
                         "in our own safetensors format")
    if cfg.channel_mult[0] != 1:
        raise ValueError(f"unet.channel_mult={cfg.channel_mult} starts at {cfg.channel_mult[0]}: diffusers' "
                         "conv_in writes block_out_channels[0] channels, so only channel_mult[0] == 1 converts")


def attention_levels(cfg: UNetConfig) -> list[bool]:
    """Whether each level (downsampling factor 1, 2, 4, ...) has attention blocks."""
    return [2 ** level in cfg.attention_ds for level in range(len(cfg.channel_mult))]


def _block_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """CompVis module prefix -> diffusers module prefix, for every block of the UNet."""
    n = cfg.num_res_blocks
    has_attn = attention_levels(cfg)
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
    check_diffusers_unet(cfg)
    prefixes = _block_prefixes(cfg)
    converted = {}
    for key, tensor in state_dict.items():
        prefix = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise ValueError(f"no diffusers name for UNet parameter {key!r}; is `cfg` the config "
                             "this state dict was trained with?")
        rest = key[len(prefix) + 1:]
        if ".resnets." in prefixes[prefix]:
            param_path, _, leaf = rest.rpartition(".")
            rest = f"{_RESNET[param_path]}.{leaf}"
        converted[f"{prefixes[prefix]}.{rest}"] = tensor
    return converted


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """The inverse of `unet_to_diffusers`: diffusers `UNet2DConditionModel` keys -> our layout."""
    inverse = unet_to_diffusers({k: k for k in unet_keys(cfg)}, cfg)  # diffusers key -> our key
    unknown = sorted(set(state_dict) - set(inverse))
    if unknown:
        raise ValueError(f"{len(unknown)} diffusers UNet keys have no counterpart in this config, "
                         f"e.g. {unknown[:5]}; build `cfg` to match the diffusers model's config")
    return {inverse[k]: v for k, v in state_dict.items()}


def unet_keys(cfg: UNetConfig) -> list[str]:
    """Our UNet's state-dict keys for `cfg`, without allocating its weights."""
    with torch.device("meta"):
        return list(UNet(cfg).state_dict())


def diffusers_unet_config(cfg: UNetConfig, sample_size: int | tuple[int, int]) -> dict:
    """`UNet2DConditionModel.from_config` arguments for the UNet `cfg` builds (latent side `sample_size`).

    diffusers' `attention_head_dim` is, for this class, the number of heads per level (its
    documented naming slip); channels-per-head configs become a per-level head count.
    """
    check_diffusers_unet(cfg)
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    has_attn = attention_levels(cfg)
    heads = cfg.num_heads if cfg.num_heads > 0 else [w // cfg.num_head_channels for w in widths]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size if isinstance(sample_size, int) else list(sample_size),
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": heads, "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth,
        # The CompVis choices our UNet makes: [cos | sin] embedding without frequency shift,
        # 1x1-conv transformer projections, GroupNorm(32, eps=1e-5), SiLU, padded conv downsampling.
        "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "downsample_padding": 1,
        "dropout": cfg.dropout,
    }
