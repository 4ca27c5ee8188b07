"""Structured config of `jobs.train_autoencoder` (the first stage, Sec. 3.1, App. G, Tab. 8).

The schema is registered in Hydra's ConfigStore as `train_autoencoder_schema` (jobs/config.py);
conf/train_autoencoder.yaml and conf/experiment/ae_*.yaml only set values. Validation runs
in `__post_init__` (via `jobs.config.to_dataclass`) before any work, with messages naming
the key to override.
"""
from dataclasses import dataclass, field

from omegaconf import MISSING

from jobs.checkpointing import CheckpointConfig
from jobs.metrics import LoggerConfig
from ldm.autoencoder.config import AUTOENCODER_PRESETS, AutoencoderConfig
from ldm.autoencoder.loss import FirstStageLossConfig
from pipeline.image_loader import ImageDataConfig

PRECISIONS = ("bf16", "fp32")


@dataclass
class AutoencoderModelConfig:
    preset: str = "kl-f8"      # a key of ldm.autoencoder.config.AUTOENCODER_PRESETS (Tab. 8 rows, debug-*)
    vq_beta: float = 0.25      # VQ commitment weight beta (VQ-VAE Eq. 3)

    def __post_init__(self):
        if self.preset not in AUTOENCODER_PRESETS:
            raise ValueError(f"model.preset={self.preset!r}: use one of {sorted(AUTOENCODER_PRESETS)}")

    @property
    def autoencoder(self) -> AutoencoderConfig:
        return AUTOENCODER_PRESETS[self.preset]


@dataclass
class AutoencoderLossConfig:
    """Eq. 25's weights (ldm.autoencoder.loss.FirstStageLossConfig) plus where LPIPS comes from."""
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    logvar_init: float = 0.0
    learn_logvar: bool = False     # CompVis leaves logvar out of every optimizer; True trains it
    disc_start: int = 50001        # first step with the adversarial terms (Tab. 8)
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"
    disc_num_layers: int = 3
    lpips_vgg_path: str | None = None    # torchvision vgg16-397923af.pth; None: torch hub cache
    lpips_heads_path: str | None = None  # LPIPS v0.1 heads; None: the `lpips` package's file
    lpips_allow_download: bool = False   # fetch the VGG16 weights into torch hub's cache

    def first_stage_loss(self, kind: str) -> FirstStageLossConfig:
        try:
            return FirstStageLossConfig(
                kind=kind, perceptual_weight=self.perceptual_weight, kl_weight=self.kl_weight,
                codebook_weight=self.codebook_weight, logvar_init=self.logvar_init,
                disc_start=self.disc_start, disc_weight=self.disc_weight, disc_factor=self.disc_factor,
                disc_loss=self.disc_loss, disc_num_layers=self.disc_num_layers)
        except ValueError as err:
            raise ValueError(f"loss.{err}") from err


@dataclass
class AutoencoderOptimConfig:
    base_lr: float = 4.5e-6     # Tab. 8 / App. G
    scale_lr: bool = True       # lr = base_lr * batch_size * world_size, as the CompVis code does
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # both optimizers (VQGAN)
    weight_decay: float = 0.0
    disc_lr_mult: float = 1.0   # discriminator lr = lr * disc_lr_mult
    grad_clip: float = 0.0      # max grad norm of the autoencoder; 0 = off

    def __post_init__(self):
        if self.base_lr <= 0 or self.disc_lr_mult <= 0:
            raise ValueError("optim.base_lr and optim.disc_lr_mult must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}: two values in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0")

    def lr(self, batch_size: int, world_size: int) -> float:
        return self.base_lr * batch_size * world_size if self.scale_lr else self.base_lr


@dataclass
class AutoencoderTrainerConfig:
    max_steps: int = 100_000
    precision: str = "bf16"       # bf16 autocast (weights and optimizer stay fp32) | fp32
    ema_decay: float | None = None  # None: no EMA; else evaluate and export the EMA weights
    device: str = "auto"          # auto | cpu | cuda
    deterministic: bool = False   # torch.use_deterministic_algorithms (slower on GPU)

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ValueError(f"trainer.max_steps={self.max_steps}: must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r}: use one of {PRECISIONS}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"trainer.ema_decay={self.ema_decay}: null, or a decay in (0, 1)")


@dataclass
class AutoencoderEvalConfig:
    every_steps: int = 5000     # also at the end of training
    num_images: int = 1000      # from the held-out shards (all ranks together)
    batch_size: int = 16
    lpips: bool = True          # needs the LPIPS weights even when loss.perceptual_weight = 0
    rfid: bool = False          # torch-fidelity FID of reconstructions vs inputs
    inception_weights_path: str | None = None  # torch-fidelity's pt_inception-2015-12-05 file
    num_grid_images: int = 8    # input / reconstruction pairs in the logged grid

    def __post_init__(self):
        if self.every_steps <= 0 or self.num_images <= 0 or self.batch_size <= 0:
            raise ValueError("eval.every_steps, eval.num_images and eval.batch_size must be positive")


@dataclass
class TrainAutoencoderConfig:
    run_dir: str = MISSING
    seed: int = 0                 # model init and training noise; data order has data.seed
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optim: AutoencoderOptimConfig = field(default_factory=AutoencoderOptimConfig)
    trainer: AutoencoderTrainerConfig = field(default_factory=AutoencoderTrainerConfig)
    eval: AutoencoderEvalConfig = field(default_factory=AutoencoderEvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export_dir: str | None = None  # default: run_dir/autoencoder

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("set run_dir to the folder for checkpoints, metrics and the exported model")
        ae = self.model.autoencoder
        self.loss.first_stage_loss(ae.kind)  # validates the loss block for this model kind
        if self.data.resolution % ae.downsample_factor:
            raise ValueError(f"data.resolution={self.data.resolution} must be a multiple of model "
                             f"{self.model.preset}'s downsampling factor {ae.downsample_factor}")
