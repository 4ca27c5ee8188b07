"""Named model presets: the paper's latent diffusion models (Tab. 12-17) and tiny debug ones.

`PRESETS[name]` is a frozen `LDMPreset`; `build(name)` returns its modules. Everything
here is buildable under `with torch.device("meta")`, so sizes can be counted without memory.
The hyper-parameters are from the paper's tables and its released configurations
(shared/PAPER_CONFIGS.md); `paper_num_params` is the count the paper reports, which
tests/test_presets.py checks our modules against.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from ldm.autoencoder.config import AUTOENCODER_PRESETS
from ldm.autoencoder.model import build_autoencoder
from ldm.diffusion.conditioners import (
    ClassEmbedder,
    ConcatConditioner,
    SpatialRescaler,
    TextTransformer,
    TextTransformerConfig,
)
from ldm.diffusion.layout import NUM_TOKENS, SEQUENCE_LENGTH, empty_layout_ids
from ldm.diffusion.schedules import ScheduleConfig
from ldm.diffusion.unet import UNet, UNetConfig

CONDITIONER_KINDS = ("none", "text", "layout", "class", "concat", "rescaler")
TOKEN_KINDS = ("text", "layout")  # conditioners that read token ids through a transformer trained jointly


@dataclass(frozen=True)
class ConditionerConfig:
    """tau_theta. "text": a transformer trained jointly (Eq. 3) on caption tokens; "layout": the same transformer
    on box tokens (ldm.diffusion.layout, App. E.2.1); "class": a learned embedding used as a one-token context
    (App. E.2.1); "concat"/"rescaler": the condition is concatenated to z_t."""
    kind: str = "none"
    text: TextTransformerConfig | None = None
    num_classes: int = 0
    embed_dim: int = 0
    concat_channels: int = 0         # channels the condition adds to the UNet input
    rescaler_in_channels: int = 0    # semantic maps: one-hot classes rescaled and projected
    rescaler_num_stages: int = 0

    def __post_init__(self):
        if self.kind not in CONDITIONER_KINDS:
            raise ValueError(f"conditioner.kind={self.kind!r}; choose one of {CONDITIONER_KINDS}")
        if self.kind in TOKEN_KINDS and self.text is None:
            raise ValueError(f"conditioner.kind={self.kind!r} needs conditioner.text (a TextTransformerConfig)")

    @property
    def context_dim(self) -> int | None:
        if self.kind in TOKEN_KINDS:
            return self.text.width
        return {"class": self.embed_dim}.get(self.kind)


@dataclass(frozen=True)
class LDMPreset:
    unet: UNetConfig
    autoencoder: str                 # a key of AUTOENCODER_PRESETS: the frozen first stage
    latent_size: int                 # side of the training latent (image side / f)
    schedule: ScheduleConfig
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    objective: str = "eps"
    loss_type: str = "l2"
    scale_factor: float | None = 1.0  # None: estimate 1/std of the latents (App. G)
    paper_num_params: float | None = None
    paper_count_includes_autoencoder: bool = False  # Tab. 5 counts the SR model with its first stage
    batch_size: int | None = None     # training setup where the paper states it (Tab. 12-15)
    learning_rate: float | None = None
    num_train_steps: int | None = None

    def __post_init__(self):
        if self.autoencoder not in AUTOENCODER_PRESETS:
            raise ValueError(f"autoencoder={self.autoencoder!r} is not one of {sorted(AUTOENCODER_PRESETS)}")
        ae = AUTOENCODER_PRESETS[self.autoencoder]
        if self.unet.in_channels != ae.embed_dim + self.conditioner.concat_channels:
            raise ValueError(f"unet.in_channels={self.unet.in_channels} must equal the latent channels "
                             f"{ae.embed_dim} + conditioner.concat_channels {self.conditioner.concat_channels}")
        if self.unet.out_channels != ae.embed_dim:
            raise ValueError(f"unet.out_channels={self.unet.out_channels} must equal the latent channels {ae.embed_dim}")
        if self.unet.context_dim != self.conditioner.context_dim:
            raise ValueError(f"unet.context_dim={self.unet.context_dim} must equal the conditioner's output "
                             f"width {self.conditioner.context_dim}")
        if self.latent_size % self.unet.downsample_factor:
            raise ValueError(f"latent_size={self.latent_size} is not a multiple of the UNet's downsampling")


class LDMModules(NamedTuple):
    autoencoder: nn.Module
    unet: UNet
    conditioner: nn.Module | None


def build_conditioner(cfg: ConditionerConfig) -> nn.Module | None:
    if cfg.kind in TOKEN_KINDS:
        return TextTransformer(cfg.text)
    if cfg.kind == "class":
        return ClassEmbedder(cfg.num_classes, cfg.embed_dim)
    if cfg.kind == "concat":
        return ConcatConditioner(cfg.concat_channels)
    if cfg.kind == "rescaler":
        return SpatialRescaler(cfg.rescaler_num_stages, cfg.rescaler_in_channels, cfg.concat_channels, 0.5)
    return None


def build(name: str) -> LDMModules:
    """The preset's modules: frozen first stage, UNet, conditioner (None for unconditional models)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    return LDMModules(build_autoencoder(AUTOENCODER_PRESETS[preset.autoencoder]), UNet(preset.unet),
                      build_conditioner(preset.conditioner))


def num_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def trainable_num_params(name: str, modules: LDMModules) -> int:
    """What the paper counts: UNet + trainable conditioner (+ the first stage where it says so)."""
    count = num_params(modules.unet) + num_params(modules.conditioner)
    if PRESETS[name].paper_count_includes_autoencoder:
        count += num_params(modules.autoencoder)
    return count


def _linear(beta_start: float, beta_end: float) -> ScheduleConfig:
    return ScheduleConfig(kind="linear", beta_start=beta_start, beta_end=beta_end, num_timesteps=1000)


# The paper's text encoder of the 1.45B model: BERT WordPiece vocabulary, 32 layers of width 1280.
BERT_1P45B = TextTransformerConfig(vocab_size=30522, max_length=77, width=1280, depth=32, num_heads=8, head_dim=64)
# Layout-to-image: boxes tokenised into 8192 tokens, 92 per image, a 16-layer transformer of width 512. The empty
# condition (guidance dropout, unconditional branch) is the empty layout: 30 padding slots and the full crop.
LAYOUT_TRANSFORMER = TextTransformerConfig(vocab_size=NUM_TOKENS, max_length=SEQUENCE_LENGTH, width=512, depth=16,
                                           num_heads=8, head_dim=64, empty_ids=empty_layout_ids(NUM_TOKENS))
# Debug text encoder: the OpenCLIP BPE vocabulary (ships with open_clip, works offline), short captions.
DEBUG_TEXT = TextTransformerConfig(vocab_size=49408, max_length=16, width=64, depth=2, num_heads=4, head_dim=16,
                                   empty_ids=(49406, 49407))
# Debug layout encoder (tests): the paper's 8192-token box vocabulary and 92 tokens through a tiny transformer.
DEBUG_LAYOUT = TextTransformerConfig(vocab_size=NUM_TOKENS, max_length=SEQUENCE_LENGTH, width=64, depth=2, num_heads=4,
                                     head_dim=16, empty_ids=empty_layout_ids(NUM_TOKENS))
DEMO_LAYOUT = TextTransformerConfig(vocab_size=257, max_length=SEQUENCE_LENGTH, width=64, depth=1, num_heads=4,
                                    head_dim=16, mlp_ratio=2, empty_ids=empty_layout_ids(257))
UNET_UNCOND_VQ4 = UNetConfig(3, 3, 224, (1, 2, 3, 4), 2, (8, 4, 2), num_head_channels=32)
DEBUG_UNET = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_head_channels=16)

PRESETS: dict[str, LDMPreset] = {
    "ldm-kl8-t2i-1.45b": LDMPreset(
        UNetConfig(4, 4, 320, (1, 2, 4, 4), 2, (4, 2, 1), num_heads=8, context_dim=1280),
        "kl-f8", 32, _linear(0.00085, 0.012), ConditionerConfig("text", text=BERT_1P45B),
        scale_factor=0.18215, paper_num_params=1.45e9, batch_size=680, learning_rate=1.0e-4,
        num_train_steps=390_000),
    # The unconditional LDM-4 of Tab. 12: CelebA-HQ, FFHQ and LSUN-Bedrooms share the network and differ in
    # their training setup.
    "ldm-vq4-celebahq": LDMPreset(
        UNET_UNCOND_VQ4, "vq-f4", 64, _linear(0.0015, 0.0195), paper_num_params=274e6,
        batch_size=48, learning_rate=9.6e-5, num_train_steps=410_000),
    "ldm-vq4-ffhq": LDMPreset(
        UNET_UNCOND_VQ4, "vq-f4", 64, _linear(0.0015, 0.0195), paper_num_params=274e6,
        batch_size=42, learning_rate=8.4e-5, num_train_steps=635_000),
    "ldm-vq4-bedrooms": LDMPreset(
        UNET_UNCOND_VQ4, "vq-f4", 64, _linear(0.0015, 0.0195), paper_num_params=274e6,
        batch_size=48, learning_rate=9.6e-5, num_train_steps=1_900_000),
    "ldm-kl8-churches": LDMPreset(
        UNetConfig(4, 4, 192, (1, 2, 2, 4, 4), 2, (1, 2, 4, 8), num_heads=8, use_scale_shift_norm=True,
                   resblock_updown=True),
        "kl-f8", 32, _linear(0.0015, 0.0155), loss_type="l1", scale_factor=None, paper_num_params=294e6,
        batch_size=96, learning_rate=5.0e-5, num_train_steps=500_000),
    "ldm-vq4-cin": LDMPreset(
        UNetConfig(3, 3, 192, (1, 2, 3, 5), 2, (8, 4, 2), num_heads=1, context_dim=512),
        "vq-f4", 64, _linear(0.0015, 0.0195), ConditionerConfig("class", num_classes=1000, embed_dim=512),
        paper_num_params=395e6, batch_size=1200, learning_rate=1.0e-4, num_train_steps=178_000),
    "ldm-vq8-cin": LDMPreset(
        UNetConfig(4, 4, 256, (1, 2, 4), 2, (4, 2, 1), num_head_channels=32, context_dim=512),
        "vq-f8", 32, _linear(0.0015, 0.0195), ConditionerConfig("class", num_classes=1000, embed_dim=512),
        paper_num_params=395e6, batch_size=64, num_train_steps=2_900_000),
    "ldm-vq4-sr": LDMPreset(
        UNetConfig(6, 3, 160, (1, 2, 2, 4), 2, (8,), num_head_channels=32),
        "vq-f4", 64, _linear(0.0015, 0.0155), ConditionerConfig("concat", concat_channels=3),
        paper_num_params=169e6, paper_count_includes_autoencoder=True),
    "ldm-vq4-inpainting": LDMPreset(
        UNetConfig(7, 3, 128, (1, 4, 8), 2, (), num_heads=8),
        "vq-f4-noattn", 64, _linear(0.0015, 0.0205), ConditionerConfig("concat", concat_channels=4),
        loss_type="l1", paper_num_params=215e6),
    "ldm-vq4-inpainting-big": LDMPreset(
        UNetConfig(7, 3, 256, (1, 2, 3, 4), 2, (8, 4, 2), num_heads=8, resblock_updown=True),
        "vq-f4-noattn", 64, _linear(0.0015, 0.0205), ConditionerConfig("concat", concat_channels=4),
        paper_num_params=387e6),
    "ldm-vq4-layout-openimages": LDMPreset(
        UNetConfig(3, 3, 128, (1, 2, 3, 4), 2, (8, 4, 2), num_head_channels=32, context_dim=512,
                   transformer_depth=3),
        "vq-f4", 64, _linear(0.0015, 0.0205), ConditionerConfig("layout", text=LAYOUT_TRANSFORMER),
        loss_type="l1", paper_num_params=306e6, batch_size=24, learning_rate=4.8e-5, num_train_steps=4_400_000),
    # COCO from scratch (Tab. 9 LDM-8, Tab. 15): the heads' width is not given; 32 channels as the OI model is our choice.
    "ldm-vq8-layout-coco": LDMPreset(
        UNetConfig(4, 4, 192, (1, 2, 4), 2, (1, 2, 4), num_head_channels=32, context_dim=512, transformer_depth=2,
                   dropout=0.1),
        "vq-f8", 32, _linear(0.0015, 0.0205), ConditionerConfig("layout", text=LAYOUT_TRANSFORMER),
        loss_type="l1", paper_num_params=345e6, batch_size=48, learning_rate=4.8e-5, num_train_steps=170_000),
    "ldm-vq4-semantic": LDMPreset(
        UNetConfig(6, 3, 128, (1, 4, 8), 2, (), num_heads=8),
        "vq-f4", 64, _linear(0.0015, 0.0205),
        ConditionerConfig("rescaler", concat_channels=3, rescaler_in_channels=182, rescaler_num_stages=2),
        loss_type="l1", paper_num_params=215e6),
    # Tiny presets of each family, for tests and the demo (16x16 latents of the debug autoencoders).
    "debug-t2i": LDMPreset(
        UNetConfig(4, 4, context_dim=64, **DEBUG_UNET), "debug-kl", 16, _linear(0.00085, 0.012),
        ConditionerConfig("text", text=DEBUG_TEXT), scale_factor=None),
    "debug-cin": LDMPreset(
        UNetConfig(4, 4, context_dim=64, **DEBUG_UNET), "debug-kl", 16, _linear(0.0015, 0.0195),
        ConditionerConfig("class", num_classes=10, embed_dim=64), scale_factor=None),
    "debug-layout": LDMPreset(
        UNetConfig(4, 4, context_dim=64, **DEBUG_UNET), "debug-kl", 16, _linear(0.0015, 0.0205),
        ConditionerConfig("layout", text=DEBUG_LAYOUT), loss_type="l1", scale_factor=None),
    "debug-uncond": LDMPreset(
        UNetConfig(4, 4, **DEBUG_UNET), "debug-vq", 16, _linear(0.0015, 0.0195)),
    # The CPU demo (jobs/demo/run.py): 32x32 scenes through debug-kl (f=4) -> 8x8x4 latents, a quarter of
    # debug-t2i's cost per image; cross-attention at both levels ties caption words to places. The
    # schedule of the paper's class-conditional models: at t = T it keeps 1.2% of the signal where the
    # text model's keeps 6.8%, enough of an 8x8 latent for the model to read a shape's place from z_T
    # in training, which pure noise at sampling time does not hold: it then ignores "top left"
    # (measured at 500 steps: shapes in the right quadrant 0.30 with the text schedule, 0.80 with this).
    "demo-t2i": LDMPreset(
        UNetConfig(4, 4, context_dim=64, **{**DEBUG_UNET, "attention_ds": (1, 2)}), "debug-kl", 8,
        _linear(0.0015, 0.0195), ConditionerConfig("text", text=DEBUG_TEXT), scale_factor=None),
    # The CPU demo's unconditional model (jobs.demo --task guiding, image guiding of App. C): 8x8x4 latents
    # of the 32 px scenes, the unconditional models' schedule (Tab. 12), a KL first stage: the guider's
    # gradient through a VQ decoder only moves a sample where a code flips.
    "demo-uncond": LDMPreset(
        UNetConfig(4, 4, **DEBUG_UNET), "debug-kl", 8, _linear(0.0015, 0.0195), scale_factor=None),
    # The CPU demo's class-conditional model (jobs.demo --task class): 8x8x4 latents of the 32 px scenes, the
    # class (the scene's shape) a one-token context through cross-attention, as ldm-vq4-cin; the class models'
    # schedule. Index 3 is the null class of guidance dropout.
    "demo-cin": LDMPreset(
        UNetConfig(4, 4, context_dim=64, **DEBUG_UNET), "debug-kl", 8, _linear(0.0015, 0.0195),
        ConditionerConfig("class", num_classes=3, embed_dim=64), scale_factor=None),
    # The CPU demo's layout-to-image model (jobs.demo --task layout): 8x8x4 latents of 32 px scenes of 1-3 shapes, their
    # boxes as 92 tokens (30 object slots + crop) through a small transformer trained jointly. Its vocabulary of 257
    # gives a 16x16 grid (2 px cells at 32 px) where the paper's 8192 gives 90x90 for 256 px. One transformer layer
    # (MLP x2) and attention at 4x4 only, for the demo's time: on 2 CPU cores it trains at 316 img/s against 202
    # with two layers and attention at 8x8 too, and in one run of 1500 steps each it followed its boxes no less.
    "demo-layout": LDMPreset(
        UNetConfig(4, 4, context_dim=64, **DEBUG_UNET), "debug-kl", 8,
        _linear(0.0015, 0.0205), ConditionerConfig("layout", text=DEMO_LAYOUT), loss_type="l1", scale_factor=None),
    "debug-sr": LDMPreset(
        UNetConfig(7, 4, **DEBUG_UNET), "debug-vq", 16, _linear(0.0015, 0.0155),
        ConditionerConfig("concat", concat_channels=3)),
    "debug-inpainting": LDMPreset(
        UNetConfig(9, 4, **DEBUG_UNET), "debug-kl", 16, _linear(0.0015, 0.0205),
        ConditionerConfig("concat", concat_channels=5), loss_type="l1", scale_factor=None),
    # The CPU demo's inpainting (jobs.demo --task inpainting): 8x8x4 latents of 32 px scenes + the masked
    # scene's latent and the mask at 8x8, the inpainting models' schedule and L1 loss.
    "demo-inpainting": LDMPreset(
        UNetConfig(9, 4, **DEBUG_UNET), "debug-kl", 8, _linear(0.0015, 0.0205),
        ConditionerConfig("concat", concat_channels=5), loss_type="l1", scale_factor=None),
    # Tiny semantic synthesis (tests): 16x16x4 latents of 64 px images with a 4-class map rescaled 64 -> 16
    # (two bilinear halvings) and mapped to 3 channels by the trained 1x1 conv, as ldm-vq4-semantic.
    "debug-semantic": LDMPreset(
        UNetConfig(7, 4, **DEBUG_UNET), "debug-kl", 16, _linear(0.0015, 0.0205),
        ConditionerConfig("rescaler", concat_channels=3, rescaler_in_channels=4, rescaler_num_stages=2),
        loss_type="l1", scale_factor=None),
    # The CPU demo's semantic synthesis (jobs.demo --task semantic): 8x8x4 latents of 32 px scenes, maps of
    # background + the 3 shapes (jobs.demo.scenes) rescaled 32 -> 8.
    "demo-semantic": LDMPreset(
        UNetConfig(7, 4, **DEBUG_UNET), "debug-kl", 8, _linear(0.0015, 0.0205),
        ConditionerConfig("rescaler", concat_channels=3, rescaler_in_channels=4, rescaler_num_stages=2),
        loss_type="l1", scale_factor=None),
    # The CPU demo's x4 super-resolution (jobs.demo --task sr): 8x8x4 latents of 32 px scenes (debug-kl,
    # f=4) with the 8x8 low-res image concatenated, the SR models' schedule.
    "demo-sr": LDMPreset(
        UNetConfig(7, 4, **DEBUG_UNET), "debug-kl", 8, _linear(0.0015, 0.0155),
        ConditionerConfig("concat", concat_channels=3), scale_factor=None),
}
