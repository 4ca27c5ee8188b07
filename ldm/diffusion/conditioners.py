"""The domain-specific encoders tau_theta of the LDM paper (Sec. 3.3, Eq. 3, App. E.2).

tau_theta maps a condition y to an intermediate representation tau_theta(y) in R^{M x d_tau} that
the UNet's cross-attention layers read as keys and values (Eq. 3). Every cross-attention
conditioner here returns a context `[B, M, d_tau]`; the concat conditioners (tau = identity, used
for super-resolution, inpainting and semantic synthesis) return a spatial map that is concatenated
with z_t instead.

Classifier-free guidance needs the "empty" condition. Each cross-attention conditioner gives its
*input* through `null_condition(batch_size)` (tokens of "" for text, the extra null row for
classes), so the empty condition goes through the same forward as any other. Concat conditioners
have no shape-free empty input; they give `null_like(c) = zeros_like(c)` instead.

Frozen pretrained text encoders (SD-style OpenCLIP / CLIP) load weights through open_clip or
transformers: the one place in ldm/ allowed to read files. Those libraries are imported lazily
so that `import ldm` stays pure torch.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.diffusion.tokenizers import HFCLIPTokenizer, OpenCLIPTokenizer

OPEN_CLIP_LAYERS = ("last", "penultimate")


def _check_token_length(tokens_BL: torch.Tensor, max_length: int) -> None:
    if tokens_BL.ndim != 2:
        raise ValueError(f"tokens must be [B, L] token ids, got shape {tuple(tokens_BL.shape)}")
    if tokens_BL.shape[1] > max_length:
        raise ValueError(
            f"{tokens_BL.shape[1]} tokens exceed max_length={max_length}; truncate them in the "
            f"tokenizer (max_length={max_length}) or raise the conditioner's max_length")


# --------------------------------------------------------------------------------------------
# The jointly trained text transformer of the text-to-image model (Sec. 4.3.1, App. E.2, Tab. 15)


@dataclass(frozen=True)
class TextTransformerConfig:
    """Defaults: the released 1.45B text-to-image model's tau_theta (542.9M parameters).

    `empty_ids` are the tokens of "" before padding with 0: BERT's [CLS] [SEP].
    """
    vocab_size: int = 30522
    max_length: int = 77
    width: int = 1280
    depth: int = 32
    num_heads: int = 8
    head_dim: int = 64
    mlp_ratio: int = 4
    empty_ids: tuple[int, ...] = (101, 102)

    def __post_init__(self):
        if len(self.empty_ids) > self.max_length:
            raise ValueError(f"empty_ids {self.empty_ids} do not fit in max_length={self.max_length}")
        if any(not 0 <= i < self.vocab_size for i in self.empty_ids):
            raise ValueError(
                f"empty_ids {self.empty_ids} must be ids below vocab_size={self.vocab_size}")


class SelfAttention(nn.Module):
    """Unmasked multi-head self-attention; inner width num_heads * head_dim may differ from width."""

    def __init__(self, width: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(width, 3 * num_heads * head_dim, bias=False)
        self.to_out = nn.Linear(num_heads * head_dim, width)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(
            self.to_qkv(x_BLD), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        # No mask: the paper's encoder attends to padding tokens too (its released behaviour).
        out_BHLd = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.to_out(rearrange(out_BHLd, "b h l d -> b l (h d)"))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, num_heads: int, head_dim: int, mlp_ratio: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, head_dim)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, width * mlp_ratio), nn.GELU(), nn.Linear(width * mlp_ratio, width))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.attn(self.norm_attn(x_BLD))
        return x_BLD + self.mlp(self.norm_mlp(x_BLD))


class TextTransformer(nn.Module):
    """tau_theta for text-to-image (App. E.2): token + learned absolute position embeddings, `depth`
    pre-LN blocks, a final LayerNorm. Trained jointly with the UNet (Eq. 3). There is no output
    projection to the vocabulary: the original code builds one (about 39M parameters) but never
    uses it.
    """

    def __init__(self, cfg: TextTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embedding = nn.Embedding(cfg.max_length, cfg.width)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio)
            for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embedding.weight, std=0.02)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        _check_token_length(tokens_BL, self.cfg.max_length)
        x_BLD = self.token_embedding(tokens_BL) + self.pos_embedding.weight[: tokens_BL.shape[1]]
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return self.norm_out(x_BLD)  # [B, L, width]

    def null_condition(self, batch_size: int) -> torch.Tensor:
        """Tokens of "" ([CLS] [SEP] then 0-padding), [B, max_length], for classifier-free guidance."""
        tokens_BL = torch.zeros(
            batch_size, self.cfg.max_length, dtype=torch.long, device=self.token_embedding.weight.device)
        tokens_BL[:, : len(self.cfg.empty_ids)] = torch.tensor(self.cfg.empty_ids)
        return tokens_BL


# --------------------------------------------------------------------------------------------
# Class-conditional models (Sec. 4.3.1, Tab. 15: a 1001 x 512 embedding for ImageNet)


class ClassEmbedder(nn.Module):
    """tau_theta(y) = E[y], a one-token context [B, 1, D]. Row `num_classes` is the null class that
    classifier-free guidance trains with (dropped labels) and samples with."""

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    def forward(self, labels_B: torch.Tensor) -> torch.Tensor:
        if labels_B.ndim != 1:
            raise ValueError(
                f"labels must be a [B] tensor of class ids, got shape {tuple(labels_B.shape)}")
        # The range check syncs with the device; it is one small reduction per batch.
        if labels_B.numel() and (labels_B.min() < 0 or labels_B.max() > self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got min {int(labels_B.min())} max {int(labels_B.max())}")
        return self.embedding(labels_B)[:, None, :]  # [B, 1, D]

    def null_condition(self, batch_size: int) -> torch.Tensor:
        return torch.full(
            (batch_size,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device)


# --------------------------------------------------------------------------------------------
# Concat conditioning (Sec. 4.4-4.5: super-resolution, inpainting, semantic synthesis)


class ConcatConditioner(nn.Module):
    """tau = identity: the condition (low-res image, masked image + mask, ...) is concatenated with
    z_t along channels. `channels` is what the UNet expects on top of the latent channels.

    No `null_condition(batch_size)`: the empty input needs the spatial shape, so use `null_like(c)`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, c_BCHW: torch.Tensor) -> torch.Tensor:
        if c_BCHW.ndim != 4 or c_BCHW.shape[1] != self.channels:
            raise ValueError(
                f"concat condition must be [B, {self.channels}, H, W], got {tuple(c_BCHW.shape)}; "
                f"fix the data or the conditioner's channels")
        return c_BCHW

    def null_like(self, c_BCHW: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(c_BCHW)


class SpatialRescaler(nn.Module):
    """Semantic-synthesis conditioner (ldm-vq4-semantic): a one-hot class map is rescaled
    `num_stages` times by `multiplier` (bilinear), then a bias-free 1x1 conv maps its classes to
    `out_channels` that are concatenated with z_t. Trained with the UNet."""

    def __init__(self, num_stages: int, in_channels: int, out_channels: int, multiplier: float = 0.5):
        super().__init__()
        if num_stages < 0:
            raise ValueError(f"num_stages={num_stages} must be >= 0")
        self.num_stages = num_stages
        self.in_channels = in_channels
        self.multiplier = multiplier
        self.channel_mapper = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, c_BCHW: torch.Tensor) -> torch.Tensor:
        if c_BCHW.ndim != 4 or c_BCHW.shape[1] != self.in_channels:
            raise ValueError(
                f"SpatialRescaler expects [B, {self.in_channels}, H, W], got {tuple(c_BCHW.shape)}")
        for _ in range(self.num_stages):
            c_BCHW = F.interpolate(c_BCHW, scale_factor=self.multiplier, mode="bilinear")
        return self.channel_mapper(c_BCHW)

    def null_like(self, c_BCHW: torch.Tensor) -> torch.Tensor:
        """Zeros shaped like the input map (no class at any pixel)."""
        return torch.zeros_like(c_BCHW)


CONCAT_CONDITIONERS = (ConcatConditioner, SpatialRescaler)  # their output joins z_t's channels


# --------------------------------------------------------------------------------------------
# Frozen pretrained text encoders (the SD-style alternative to the jointly trained transformer)


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def _create_open_clip(arch: str, pretrained: str | None) -> nn.Module:
    import open_clip

    has_schema = arch.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip arch {arch!r}; use one of open_clip.list_models()")
    tags = [] if has_schema else open_clip.list_pretrained_tags_by_model(arch)
    if pretrained is not None and not os.path.isfile(pretrained) and pretrained not in tags:
        raise ValueError(
            f"pretrained={pretrained!r} is neither a local checkpoint file nor an open_clip tag of "
            f"{arch!r} ({tags}); pass a path to a .safetensors / .bin / .pt checkpoint or a tag")
    try:
        # open_clip reads local files with safetensors or torch.load(weights_only=True).
        return open_clip.create_model(arch, pretrained=pretrained)
    except RuntimeError as err:
        raise ValueError(
            f"could not load open_clip weights {pretrained!r} for {arch!r} (offline, or not in the "
            f"cache?): pass pretrained=<local path to open_clip_pytorch_model.bin or "
            f"open_clip_model.safetensors> instead") from err


def _open_clip_text_tower(model: nn.Module, arch: str) -> nn.Module:
    # CLIP keeps the text tower's parts on the model itself; CustomTextCLIP under `.text`.
    tower = getattr(model, "text", model)
    parts = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(hasattr(tower, p) for p in parts):
        raise ValueError(f"{arch!r} has no open_clip TextTransformer text tower (HF text towers are "
                         f"not supported); use FrozenHFCLIPTextEncoder for transformers models")
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        raise ValueError(f"{arch!r} uses a class token or padding mask (CoCa-style); pick a CLIP arch")
    return tower


class FrozenOpenCLIPTextEncoder(nn.Module):
    """Frozen OpenCLIP text tower returning per-token hidden states [B, 77, width].

    layer="last": all blocks then ln_final. layer="penultimate": all blocks but the last, then
    ln_final -- what Stable Diffusion 2.x does (its FrozenOpenCLIPEmbedder stops one block early and
    still applies ln_final); the unused last block is dropped. The causal mask of CLIP is kept.
    `pretrained`: a local checkpoint path, an open_clip tag (needs the hub or its cache), or None
    for random init (tests).
    """

    def __init__(self, arch: str, pretrained: str | None = None, layer: str = "last"):
        super().__init__()
        if layer not in OPEN_CLIP_LAYERS:
            raise ValueError(f"layer={layer!r}; use one of {OPEN_CLIP_LAYERS}")
        tower = _open_clip_text_tower(_create_open_clip(arch, pretrained), arch)
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding  # [L, width]
        blocks = tower.transformer.resblocks
        self.blocks = blocks if layer == "last" else blocks[:-1]
        # open_clip < 2.24 runs its blocks sequence-first (LND).
        self.batch_first = getattr(tower.transformer, "batch_first", False)
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)  # causal [L, L]
        self.max_length = self.positional_embedding.shape[0]
        self.tokenizer = OpenCLIPTokenizer(self.max_length)
        if self.tokenizer.vocab_size > self.token_embedding.num_embeddings:
            raise ValueError(f"{arch!r} has {self.token_embedding.num_embeddings} token embeddings, "
                             f"fewer than the CLIP BPE vocabulary; pick an arch with the CLIP tokenizer")
        _freeze(self)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and norms stay in eval mode

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        _check_token_length(tokens_BL, self.max_length)
        num_tokens = tokens_BL.shape[1]
        x = self.token_embedding(tokens_BL) + self.positional_embedding[:num_tokens]
        attn_mask = None if self.attn_mask is None else self.attn_mask[:num_tokens, :num_tokens]
        x = x if self.batch_first else x.transpose(0, 1)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        x_BLD = x if self.batch_first else x.transpose(0, 1)
        return self.ln_final(x_BLD)  # [B, L, width]

    def null_condition(self, batch_size: int) -> torch.Tensor:
        tokens_1L = self.tokenizer([""]).to(self.token_embedding.weight.device)
        return tokens_1L.expand(batch_size, -1).clone()


class FrozenHFCLIPTextEncoder(nn.Module):
    """Frozen transformers `CLIPTextModel` (e.g. "openai/clip-vit-large-patch14", SD 1.x) returning
    last_hidden_state [B, 77, width]; the tokenizer comes from the same hub id or folder."""

    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import CLIPTextModel

        try:
            self.transformer = CLIPTextModel.from_pretrained(name_or_path)
        except OSError as err:
            raise ValueError(
                f"could not load a CLIPTextModel from {name_or_path!r}: pass a cached hub id or a "
                f"local folder holding config.json and the weights") from err
        self.max_length = self.transformer.config.max_position_embeddings
        self.tokenizer = HFCLIPTokenizer(name_or_path, self.max_length)
        _freeze(self)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and norms stay in eval mode

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        _check_token_length(tokens_BL, self.max_length)
        return self.transformer(input_ids=tokens_BL).last_hidden_state  # [B, L, width]

    def null_condition(self, batch_size: int) -> torch.Tensor:
        tokens_1L = self.tokenizer([""]).to(self.transformer.device)
        return tokens_1L.expand(batch_size, -1).clone()
