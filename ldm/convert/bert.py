"""The paper's text encoder as released (x-transformers `BERTEmbedder`) <-> our `TextTransformer`.

The released text-to-image model (txt2img-f8, LDM-KL-8-G, Sec. 4.3.1) stores tau_theta as CompVis'
`BERTEmbedder`: a vendored x-transformers `TransformerWrapper(Encoder(dim, depth))` under
`cond_stage_model.transformer.*`. It is the network `TextTransformer` implements (pre-LayerNorm
blocks of unmasked self-attention with bias-free q/k/v and a GELU MLP, learned absolute positions
without scaling, a final LayerNorm), with other names:

    token_emb.weight                          token_embedding.weight
    pos_emb.emb.weight                        pos_embedding.weight
    attn_layers.layers.{2i}.0.*               blocks.{i}.norm_attn.*      (LayerNorm before attention)
    attn_layers.layers.{2i}.1.to_{q,k,v}.w    blocks.{i}.attn.to_qkv.weight  (concatenated q, k, v)
    attn_layers.layers.{2i}.1.to_out.*        blocks.{i}.attn.to_out.*
    attn_layers.layers.{2i+1}.0.*             blocks.{i}.norm_mlp.*       (LayerNorm before the MLP)
    attn_layers.layers.{2i+1}.1.net.0.0.*     blocks.{i}.mlp.0.*
    attn_layers.layers.{2i+1}.1.net.2.*       blocks.{i}.mlp.2.*
    norm.*                                    norm_out.*
    to_logits.*                               (dropped: built by the original, never used)

Pure functions of state dicts (keys without the `cond_stage_model.transformer.` prefix).
"""
import torch

from ldm.diffusion.conditioners import TextTransformerConfig

XT_PREFIX = "transformer."  # BERTEmbedder's TransformerWrapper, inside cond_stage_model
UNUSED = ("to_logits.weight", "to_logits.bias")
_QKV = ("to_q", "to_k", "to_v")
_LEAVES = ("weight", "bias")


def _renames(depth: int) -> dict[str, str]:
    """x-transformers key -> our key, for every tensor but the fused q/k/v."""
    out = {"token_emb.weight": "token_embedding.weight", "pos_emb.emb.weight": "pos_embedding.weight",
           "norm.weight": "norm_out.weight", "norm.bias": "norm_out.bias"}
    for i in range(depth):
        attn, ff = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        for leaf in _LEAVES:
            out |= {f"{attn}.0.{leaf}": f"blocks.{i}.norm_attn.{leaf}",
                    f"{attn}.1.to_out.{leaf}": f"blocks.{i}.attn.to_out.{leaf}",
                    f"{ff}.0.{leaf}": f"blocks.{i}.norm_mlp.{leaf}",
                    f"{ff}.1.net.0.0.{leaf}": f"blocks.{i}.mlp.0.{leaf}",
                    f"{ff}.1.net.2.{leaf}": f"blocks.{i}.mlp.2.{leaf}"}
    return out


def _qkv_keys(i: int) -> list[str]:
    return [f"attn_layers.layers.{2 * i}.1.{name}.weight" for name in _QKV]


def text_transformer_from_xtransformers(state_dict: dict[str, torch.Tensor],
                                        cfg: TextTransformerConfig) -> dict[str, torch.Tensor]:
    """A `BERTEmbedder.transformer` state dict (x-transformers names) -> `TextTransformer(cfg)` keys.

    Keys that match nothing are kept as they are, so `ldm.convert.diffusers.load_into` lists them as unexpected
    (a config of another depth, a GLU or ScaleNorm variant the paper did not use).
    """
    renames = _renames(cfg.depth)
    qkv = {key for i in range(cfg.depth) for key in _qkv_keys(i)}
    out = {renames.get(k, k): v for k, v in state_dict.items() if k not in qkv and k not in UNUSED}
    for i in range(cfg.depth):
        keys = _qkv_keys(i)
        if all(k in state_dict for k in keys):  # rows: q then k then v, heads major (b l (three h d))
            out[f"blocks.{i}.attn.to_qkv.weight"] = torch.cat([state_dict[k] for k in keys])
        else:
            out |= {k: state_dict[k] for k in keys if k in state_dict}
    return out


def text_transformer_to_xtransformers(state_dict: dict[str, torch.Tensor],
                                      cfg: TextTransformerConfig) -> dict[str, torch.Tensor]:
    """The inverse: `TextTransformer` keys -> x-transformers names (without `to_logits`, which CompVis'
    non-strict loading leaves at its initialisation; it is never used for conditioning)."""
    inverse = {ours: theirs for theirs, ours in _renames(cfg.depth).items()}
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(".attn.to_qkv.weight"):
            i = int(key.split(".")[1])
            out |= {k: part.clone() for k, part in zip(_qkv_keys(i), tensor.chunk(3))}  # no shared storage
        elif key in inverse:
            out[inverse[key]] = tensor
        else:
            raise ValueError(f"no x-transformers name for text transformer parameter {key!r}; is `cfg` the config "
                             "this state dict was trained with?")
    return out
