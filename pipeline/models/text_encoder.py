"""Frozen pretrained text encoders for precompute and sampling: build one from config, name it.

The SD-style alternative to the paper's jointly trained tau_theta (Sec. 3.3, Eq. 3): a frozen
OpenCLIP or transformers CLIP text tower whose per-token output [L, D] is the UNet's cross-attention
context. Precompute runs it once per caption and stores KEY.context.npy; the training job then
needs no text encoder at all, but a sampler must run the very same encoder on new prompts, so
`identity` (what the manifest and the training checkpoint record) is enough to rebuild and check it:
`text_encoder_from_identity(identity)`.
"""
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.diffusion.conditioners import (
    OPEN_CLIP_LAYERS,
    FrozenHFCLIPTextEncoder,
    FrozenOpenCLIPTextEncoder,
)
from pipeline.models.autoencoder import state_dict_sha256
from pipeline.precompute.shard import encode_text_batch
from pipeline.shards import atomic_write_bytes

TEXT_ENCODER_KINDS = ("openclip", "hf_clip")
SPEC_KEYS = ("kind", "arch", "pretrained", "layer", "name_or_path")
NULL_CONTEXT_FILE = "null_context.npy"


@dataclass
class TextEncoderConfig:
    kind: str | None = None           # None: no context; openclip | hf_clip
    arch: str | None = None           # openclip: a model name ("ViT-H-14") or "local-dir:FOLDER"
    pretrained: str | None = None     # openclip: a local checkpoint file or an open_clip tag (None: local-dir:)
    layer: str = "last"               # openclip: last | penultimate (SD 2.x stops one block early)
    name_or_path: str | None = None   # hf_clip: hub id or folder (config.json, weights, tokenizer files)

    def __post_init__(self):
        kind = self.kind
        checks = [(kind in (None, *TEXT_ENCODER_KINDS),
                   f"text_encoder.kind must be null or one of {TEXT_ENCODER_KINDS}"),
                  (kind != "openclip" or bool(self.arch), "text_encoder.kind=openclip needs text_encoder.arch"),
                  (kind != "hf_clip" or bool(self.name_or_path), "text_encoder.kind=hf_clip needs text_encoder."
                                                                 "name_or_path (a hub id or a local folder)"),
                  (kind != "hf_clip" or self.arch is None and self.pretrained is None,
                   "text_encoder.arch / pretrained are openclip settings; with kind=hf_clip set name_or_path only"),
                  (kind != "openclip" or self.name_or_path is None,
                   "text_encoder.name_or_path is an hf_clip setting; with kind=openclip set arch and pretrained"),
                  (self.layer in OPEN_CLIP_LAYERS, f"text_encoder.layer must be one of {OPEN_CLIP_LAYERS}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def tokenizer(self, max_length: int) -> dict:
        """The tokenizer this encoder was trained with (a precompute TokenizerConfig, as a dict)."""
        if self.kind == "openclip":  # open_clip's CLIP BPE, the vocabulary shipped in the wheel
            return {"kind": "openclip", "name_or_path": None, "max_length": max_length}
        return {"kind": "hf_clip", "name_or_path": self.name_or_path, "max_length": max_length}


def load_text_encoder(cfg: TextEncoderConfig) -> tuple[nn.Module, dict]:
    """(frozen encoder on the CPU, identity): the spec (SPEC_KEYS), "sha256" of its weights
    (pipeline.models.autoencoder.state_dict_sha256) and "width", the D of its output [B, L, D].
    `encoder.max_length` is the most tokens it takes (its position embeddings)."""
    if cfg.kind == "openclip":
        encoder = FrozenOpenCLIPTextEncoder(cfg.arch, cfg.pretrained, cfg.layer)
        width = encoder.ln_final.normalized_shape[-1]
    elif cfg.kind == "hf_clip":
        encoder = FrozenHFCLIPTextEncoder(cfg.name_or_path)
        width = encoder.transformer.config.hidden_size
    else:
        raise ValueError(f"text_encoder.kind={cfg.kind!r}: choose one of {TEXT_ENCODER_KINDS}")
    spec = {key: getattr(cfg, key) for key in SPEC_KEYS}
    if cfg.kind == "hf_clip":
        spec["layer"] = None  # last_hidden_state only
    return encoder, spec | {"sha256": state_dict_sha256(encoder.state_dict()), "width": int(width)}


def text_encoder_from_identity(identity: dict) -> nn.Module:
    """Rebuild the encoder a manifest (or a training checkpoint's model.text_encoder) names; ValueError
    when the weights found under that name are not the ones the latents were made with."""
    spec = {key: identity.get(key) for key in SPEC_KEYS}
    encoder, found = load_text_encoder(TextEncoderConfig(**(spec | {"layer": spec["layer"] or "last"})))
    if found["sha256"] != identity["sha256"]:
        raise ValueError(f"the text encoder {spec} now has weights sha256 {found['sha256'][:12]}..., the latents "
                         f"were made with {identity['sha256'][:12]}...: point it at the original weights")
    return encoder


def load_text_encoder_for_latents(cfg: TextEncoderConfig, max_length: int) -> tuple[nn.Module, dict]:
    """(encoder, the manifest's "text_encoder": identity + "max_length" L + "null_context" file name)."""
    encoder, identity = load_text_encoder(cfg)
    if max_length > encoder.max_length:
        raise ValueError(f"tokenizer.max_length={max_length} exceeds the {encoder.max_length} positions of the "
                         f"text encoder {cfg.arch or cfg.name_or_path}: lower it")
    return encoder, identity | {"max_length": max_length, "null_context": NULL_CONTEXT_FILE}


def write_null_context(out_dir: str | Path, encoder: nn.Module, tokenize: Callable[[list[str]], torch.Tensor]) -> None:
    """`null_context.npy`: the context [L, D] of the empty caption, the condition classifier-free
    guidance drops to (computed once, in float32 where this runs; stored float16 like KEY.context.npy)."""
    buffer = io.BytesIO()
    np.save(buffer, encode_text_batch(encoder, tokenize([""]).numpy())[0], allow_pickle=False)
    atomic_write_bytes(Path(out_dir) / NULL_CONTEXT_FILE, buffer.getvalue())
