"""Configuration of the first-stage autoencoders (Sec. 3.1, App. G, Tab. 8).

One frozen dataclass describes both the KL- and the VQ-regularised model; the
presets are the Tab. 8 rows (see shared/PAPER_CONFIGS.md) plus two tiny debug
models for tests and demos. Loss-side numbers (KL weight, discriminator) belong
to the training job, not here.
"""
from dataclasses import dataclass

NUM_GROUPS = 32  # GroupNorm groups of every CompVis first-stage block


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: str                      # "kl" or "vq"
    channel_mult: tuple[int, ...]  # f = 2 ** (len(channel_mult) - 1)
    z_channels: int
    embed_dim: int                 # latent channels the diffusion model sees
    num_embeddings: int = 0        # |Z| for VQ, 0 for KL
    base_channels: int = 128
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # resolutions of a `resolution`-sized input
    mid_attention: bool = True     # False only for vq-f4-noattn
    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"kind={self.kind!r}: set kind to 'kl' or 'vq'")
        if self.kind == "vq" and self.num_embeddings <= 0:
            raise ValueError("num_embeddings must be > 0 (the codebook size |Z|) for kind='vq'")
        if self.kind == "kl" and self.num_embeddings != 0:
            raise ValueError("num_embeddings must be 0 for kind='kl' (there is no codebook)")
        self._check_positive()
        self._check_channels()
        self._check_resolutions()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must lie in [0, 1)")

    def _check_positive(self):
        for name in ("z_channels", "embed_dim", "base_channels", "num_res_blocks",
                     "resolution", "in_channels", "out_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a positive integer")

    def _check_channels(self):
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"channel_mult={self.channel_mult}: needs >= 1 positive multipliers")
        bad = [self.base_channels * m for m in self.channel_mult
               if (self.base_channels * m) % NUM_GROUPS]
        if bad:
            raise ValueError(f"base_channels * channel_mult gives {bad} channels: each must be "
                             f"a multiple of {NUM_GROUPS} (GroupNorm groups); change base_channels")

    def _check_resolutions(self):
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution={self.resolution} must be a multiple of the "
                             f"downsampling factor {self.downsample_factor}")
        # A typo here would silently remove attention, so unreachable values are errors.
        reached = {self.resolution // 2 ** i for i in range(len(self.channel_mult))}
        unreachable = sorted(set(self.attn_resolutions) - reached)
        if unreachable:
            raise ValueError(f"attn_resolutions {unreachable} are never reached; the levels of a "
                             f"{self.resolution}px input are {sorted(reached, reverse=True)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _kl(channel_mult, z_channels, attn_resolutions=()):
    return AutoencoderConfig("kl", tuple(channel_mult), z_channels, z_channels,
                             attn_resolutions=tuple(attn_resolutions))


def _vq(channel_mult, z_channels, num_embeddings, attn_resolutions=(), mid_attention=True):
    return AutoencoderConfig("vq", tuple(channel_mult), z_channels, z_channels, num_embeddings,
                             attn_resolutions=tuple(attn_resolutions), mid_attention=mid_attention)


# Tab. 8. Every paper preset has embed_dim == z_channels.
AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    "kl-f4": _kl((1, 2, 4), 3),
    "kl-f8": _kl((1, 2, 4, 4), 4),
    "kl-f16": _kl((1, 1, 2, 2, 4), 16, (16,)),
    "kl-f32": _kl((1, 1, 2, 2, 4, 4), 64, (16, 8)),
    "vq-f4": _vq((1, 2, 4), 3, 8192),
    "vq-f4-noattn": _vq((1, 2, 4), 3, 8192, mid_attention=False),
    "vq-f8": _vq((1, 2, 2, 4), 4, 16384, (32,)),
    "vq-f8-n256": _vq((1, 2, 2, 4), 4, 256, (32,)),
    "vq-f16": _vq((1, 1, 2, 2, 4), 8, 16384, (16,)),
    # Tiny f=4 models for tests and the demo: ~1M parameters, 32px images.
    "debug-kl": AutoencoderConfig("kl", (1, 2, 2), 4, 4, base_channels=32, num_res_blocks=1,
                                  attn_resolutions=(8,), resolution=32),
    "debug-vq": AutoencoderConfig("vq", (1, 2, 2), 4, 4, num_embeddings=64, base_channels=32,
                                  num_res_blocks=1, attn_resolutions=(8,), resolution=32),
}


def latent_shape(cfg: AutoencoderConfig, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent the diffusion model sees for a height x width image."""
    f = cfg.downsample_factor
    if height <= 0 or width <= 0 or height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not a positive multiple of the "
                         f"downsampling factor f={f}; crop or pad the image to a multiple of {f}")
    return cfg.embed_dim, height // f, width // f


def check_image_shape(cfg: AutoencoderConfig, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless `shape` is [B, in_channels, H, W] with H and W multiples of f."""
    if len(shape) != 4 or shape[1] != cfg.in_channels:
        raise ValueError(f"expected images [B, {cfg.in_channels}, H, W], got {list(shape)}")
    latent_shape(cfg, shape[2], shape[3])
