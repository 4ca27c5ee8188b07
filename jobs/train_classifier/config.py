"""Structured-config schema of `python -m jobs.train_classifier` (conf/train_classifier.yaml).

The classifier of noisy latents of App. D.4 (LDM-8-G): which frozen LDM it serves (`source`, `weights`, as in
jobs.sample; `model=` would select conf/model/), which labelled latents it learns from (`data`, the `conf/data/`
group: labels from `data.label_key` or `data.classes_file`, as jobs.train reads them), where it goes (`out_dir`),
and how it trains. Checks that need no model run here and raise ValueError naming the key; the model-dependent
ones (classes, latent shape, scale factor) run before the first step.
"""
from dataclasses import dataclass

from omegaconf import MISSING

from ldm.diffusion.classifier import POOLS
from pipeline.latents.loader import LatentDataConfig

WEIGHTS = ("ema", "raw")
PRECISIONS = ("fp32", "bf16")
RESUME_MODES = ("auto", "never")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainClassifierConfig:
    source: str = MISSING           # the frozen LDM: an export folder, a training checkpoint folder or a run_dir
    out_dir: str = MISSING          # classifier.safetensors + classifier.json (+ the resume state), one atomic folder
    max_steps: int = MISSING        # optimizer steps
    data: LatentDataConfig = MISSING  # config group conf/data/ (default: labels)
    weights: str = "ema"            # ema | raw: which weights of a training checkpoint (only its config is used)
    num_classes: int | None = None  # None: the LDM's classes (class-conditional models); else set it
    pool: str = "attention"         # attention (ADM's attention pooling) | mean
    # AdamW at a constant rate. 3e-4 and weight decay 0.05 are ADM's ImageNet classifiers' (guided-diffusion
    # README); the LDM-8-G classifier's own settings are not published (unverified).
    lr: float = 3.0e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    precision: str = "fp32"         # bf16: autocast around the classifier (GPUs), fp32 weights and optimizer
    device: str = "auto"            # auto | cpu | cuda
    seed: int = 0                   # initial weights, and t / eps of batch k: a function of (seed, k)
    log_every: int = 50             # steps between JSON lines (loss, accuracy over those steps)
    checkpoint_every: int = 1000    # steps between saves (and at max_steps)
    resume: str = "auto"            # auto: continue from out_dir's last save if any | never (its first save replaces it)

    def __post_init__(self):
        checks = [
            (self.weights in WEIGHTS, f"weights={self.weights!r}: use one of {WEIGHTS}"),
            (self.num_classes is None or self.num_classes >= 2,
             f"num_classes={self.num_classes}: at least 2, or null for the model's classes"),
            (self.pool in POOLS, f"pool={self.pool!r}: use one of {POOLS}"),
            (self.max_steps > 0, f"max_steps={self.max_steps}: must be positive"),
            (self.lr > 0, f"lr={self.lr}: must be positive"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0"),
            (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
             f"betas={self.betas}: two values, each in [0, 1)"),
            (self.precision in PRECISIONS, f"precision={self.precision!r}: use one of {PRECISIONS}"),
            (self.device in DEVICES, f"device={self.device!r}: use one of {DEVICES}"),
            (self.seed >= 0, f"seed={self.seed}: must be >= 0"),
            (self.log_every > 0, f"log_every={self.log_every}: must be a positive step count"),
            (self.checkpoint_every > 0, f"checkpoint_every={self.checkpoint_every}: must be a positive step count"),
            (self.resume in RESUME_MODES, f"resume={self.resume!r}: use one of {RESUME_MODES}"),
            (self.data.use_labels, "the classifier learns p(y | z_t): set data.label_key=<the metadata key holding "
                                   "the class index> or data.classes_file=<classes.txt, one class name per line>"),
            (self.data.condition is None, f"data.condition={self.data.condition!r}: the classifier reads z_t alone; "
                                          "set data.condition=null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
