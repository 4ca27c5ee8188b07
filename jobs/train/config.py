"""Structured-config schemas of `python -m jobs.train` (conf/train.yaml and its groups).

One dataclass per config group (`model`, `trainer`, `optim`, `logger`, `data`); YAML files only set
values. Cross-field checks live in `__post_init__` and raise ValueError naming the override to fix,
so a wrong config fails before any process group, model or data is touched. `check_tokens` checks the
config against the tokens its latents hold (their manifest's tokenizer), once the data is found.
"""
from dataclasses import dataclass, field

from omegaconf import MISSING

from jobs.checkpointing import CheckpointConfig
from jobs.metrics import LoggerConfig
from ldm.diffusion.objectives import LOSS_TYPES, OBJECTIVES
from ldm.presets import PRESETS
from pipeline.conditions import CONDITIONS
from pipeline.latents.loader import LatentDataConfig

PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class ModelConfig:
    preset: str = "debug-t2i"          # a key of ldm.presets.PRESETS
    train_text_encoder: bool = True    # True: tau_theta (text transformer or class embedding) trained jointly
    #                                    (Eq. 3), in the same ZeRO optimizer; False: frozen
    cond_dropout: float = 0.1          # classifier-free guidance: empty condition with this probability
    objective: str | None = None       # None: the preset's (eps, Eq. 2); "v" for v-prediction
    loss_type: str | None = None       # None: the preset's (l2 / l1)
    min_snr_gamma: float | None = None
    # The frozen text encoder whose stored context the UNet reads (data.use_context=true): filled from the
    # latents' manifest at start-up (pipeline.models.text_encoder identity), so checkpoints name what a sampler
    # must rebuild. Set by hand (+model.text_encoder.sha256=...), latents of another encoder are refused.
    text_encoder: dict = field(default_factory=dict)
    # Inpainting (data.condition=inpainting) encodes each masked image with the frozen first stage in the
    # training step: a pipeline.models.autoencoder spec; None: the one the latents' manifest names. Either
    # must be the autoencoder that made the latents (its sha256 is checked against the manifest's).
    first_stage: str | None = None

    def __post_init__(self):
        _check([(self.preset in PRESETS, f"model.preset={self.preset!r}: choose one of {sorted(PRESETS)}"),
                (0.0 <= self.cond_dropout < 1.0, f"model.cond_dropout={self.cond_dropout}: set it in [0, 1)"),
                (self.objective in (None, *OBJECTIVES), f"model.objective={self.objective!r}: one of {OBJECTIVES}"),
                (self.loss_type in (None, *LOSS_TYPES), f"model.loss_type={self.loss_type!r}: one of {LOSS_TYPES}")])

    @property
    def conditioner_kind(self) -> str:
        return PRESETS[self.preset].conditioner.kind


@dataclass
class TrainerConfig:
    zero_stage: int = 2                # DeepSpeed ZeRO stage 0-3 (conf/trainer/zero1|zero2|zero3)
    precision: str = "bf16"            # bf16: autocast around forward, fp32 weights and optimizer state
    max_steps: int = MISSING           # optimizer steps
    grad_accum_steps: int = 1
    global_batch_size: int | None = None  # checked at start-up: data.batch_size x grad_accum_steps x ranks
    grad_clip: float = 1.0             # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    max_consecutive_nonfinite: int = 5  # stop after this many non-finite losses in a row
    deterministic: bool = False        # torch.use_deterministic_algorithms (bitwise resume tests)
    compile: bool = False              # torch.compile the UNet
    compile_backend: str = "inductor"  # torch.compile's backend (eager / aot_eager: trace only, for debugging)
    activation_checkpointing: bool = False
    device: str = "auto"               # auto | cpu | cuda
    num_samples: int = 8               # images in the sample grid (every logger.image_every steps)
    sample_steps: int = 25             # DDIM steps of the grid
    guidance_scale: float = 3.0
    sample_autoencoder: str | None = None  # decode grids with it (pipeline.models.autoencoder spec); None: show z
    peak_tflops: float | None = None   # per device, for MFU; None: known GPUs, else MFU is not logged
    stop_after_steps: int | None = None  # end this process early (tests: simulate a kill); None: max_steps

    def __post_init__(self):
        _check([(self.zero_stage in (0, 1, 2, 3), f"trainer.zero_stage={self.zero_stage}: use 0, 1, 2 or 3"),
                (self.precision in PRECISIONS, f"trainer.precision={self.precision!r}: one of {PRECISIONS}"),
                (self.max_steps > 0, f"trainer.max_steps={self.max_steps}: must be positive"),
                (self.grad_accum_steps > 0, f"trainer.grad_accum_steps={self.grad_accum_steps}: must be >= 1"),
                (self.grad_clip >= 0, f"trainer.grad_clip={self.grad_clip}: must be >= 0 (0 disables)"),
                (0.0 <= self.ema_decay <= 1.0, f"trainer.ema_decay={self.ema_decay}: set it in [0, 1]"),
                (self.max_consecutive_nonfinite > 0,
                 f"trainer.max_consecutive_nonfinite={self.max_consecutive_nonfinite}: must be >= 1"),
                (self.device in ("auto", "cpu", "cuda"), f"trainer.device={self.device!r}: auto, cpu or cuda"),
                (self.num_samples > 0, f"trainer.num_samples={self.num_samples}: must be positive")])


@dataclass
class OptimConfig:
    lr: float = 1.0e-4                 # Tab. 15: 1e-4 for the text-to-image model
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1.0e-8
    warmup_steps: int = 0              # linear warm-up from 0
    schedule: str = "constant"         # after warm-up: constant | cosine | linear (to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    fused: bool = True                 # torch's fused AdamW: one kernel per step instead of ~10 passes

    def __post_init__(self):
        _check([(self.lr > 0, f"optim.lr={self.lr}: must be positive"),
                (self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps}: must be >= 0"),
                (self.schedule in LR_SCHEDULES, f"optim.schedule={self.schedule!r}: one of {LR_SCHEDULES}"),
                (0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio}: set it in [0, 1]"),
                (all(0.0 <= b < 1.0 for b in self.betas), f"optim.betas={self.betas}: each in [0, 1)")])


@dataclass
class PlanOptions:
    """Only read by `python -m jobs.plan`."""
    num_gpus: int = 8
    img_per_s_per_gpu: float | None = None  # measured throughput; None: the newest matching bench_results run
    device: str | None = None           # which GPU's bench results (a substring of its name, e.g. H100); None: any
    bench_results: str = "bench/results"  # bench/gpu.sh's results files


@dataclass
class TrainConfig:
    """The groups are MISSING here and filled by their YAML: a default-constructed group would run its
    checks (e.g. data.path unset) before the YAML sets it."""
    run_dir: str = "runs/train"
    seed: int = 0
    model: ModelConfig = MISSING  # config group conf/model/
    trainer: TrainerConfig = MISSING  # config group conf/trainer/
    optim: OptimConfig = MISSING  # config group conf/optim/
    logger: LoggerConfig = MISSING  # config group conf/logger/
    data: LatentDataConfig = MISSING  # config group conf/data/
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plan: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self):
        kind, data = self.model.conditioner_kind, self.data
        preset = f"model.preset={self.model.preset!r}"
        spatial = kind in ("concat", "rescaler")
        _check([(kind in ("text", "layout", "class", "none", "concat", "rescaler"),
                 f"{preset} has a {kind!r} conditioner, which jobs.train cannot feed: choose a text-to-image, "
                 f"layout, class-conditional, unconditional, super-resolution, inpainting or semantic preset"),
                (not spatial or data.condition is not None,
                 f"{preset} concatenates a condition to z_t: set data.condition (one of {CONDITIONS})"),
                (data.condition is None or spatial,
                 f"data.condition={data.condition!r} is concatenated to z_t, {preset} has a {kind!r} conditioner: "
                 f"choose a concat preset (ldm-vq4-sr, debug-sr) or set data.condition=null"),
                (data.condition != "semantic" or kind == "rescaler",
                 f"data.condition='semantic' conditions on segmentation maps; {preset} has a {kind!r} conditioner: "
                 f"choose a semantic preset (ldm-vq4-semantic, debug-semantic, demo-semantic)"),
                (kind != "rescaler" or data.condition in (None, "semantic"),
                 f"{preset} reads segmentation maps: set data.condition=semantic (data=semantic), not "
                 f"{data.condition!r}"),
                (self.model.first_stage is None or data.condition == "inpainting",
                 f"model.first_stage={self.model.first_stage!r} is the encoder of inpainting's masked images; "
                 f"data.condition={data.condition!r} does not use it: unset model.first_stage"),
                (kind != "text" or data.use_tokens or data.use_context,
                 "the preset's text transformer reads token ids: set data.use_tokens=true (latents precomputed "
                 "with a tokenizer), or data.use_context=true model.train_text_encoder=false (latents precomputed "
                 "with a frozen text encoder)"),
                (kind != "layout" or (data.use_tokens and not data.use_context),
                 f"{preset} is layout-to-image: its transformer reads the layout tokens, set data.use_tokens=true "
                 f"(latents precomputed with layout.boxes_key) and data.use_context=false"),
                (not data.use_context or kind == "text",
                 f"data.use_context=true feeds a text context to cross-attention; {preset} has a {kind!r} "
                 f"conditioner: choose a text-to-image preset or set data.use_context=false"),
                (not (data.use_context and self.model.train_text_encoder),
                 "data.use_context=true: the stored context comes from a frozen text encoder, there is no text "
                 "encoder to train; set model.train_text_encoder=false"),
                (kind != "class" or data.use_labels,
                 f"{preset} is class-conditional: set data.label_key=<the metadata key holding the class index> "
                 f"or data.classes_file=<classes.txt, one class name per line, matched to captions>"),
                (self.trainer.zero_stage == 0 or self.data.batch_size > 0, "data.batch_size must be positive")])

    @property
    def condition_key(self) -> str | None:
        """The batch entry the model is conditioned on (its tau_theta input y), None if unconditional."""
        kind = self.model.conditioner_kind
        if kind == "text":
            return "context" if self.data.use_context else "tokens"
        if kind == "layout":
            return "tokens"
        return {"class": "label", "concat": "concat", "rescaler": "concat"}.get(kind)


def check_tokens(cfg: TrainConfig, tokenizer: dict) -> None:
    """Layout tokens feed a layout preset, caption tokens a text preset, each of the length and (layout) vocabulary
    the preset's transformer reads."""
    text, preset = PRESETS[cfg.model.preset].conditioner.text, f"model.preset={cfg.model.preset!r}"
    if (PRESETS[cfg.model.preset].conditioner.kind == "layout") != (tokenizer["kind"] == "layout"):
        made, rerun = (("layout.boxes_key", "tokenizer.kind") if tokenizer["kind"] == "layout" else
                       (f"a {tokenizer['kind']} caption tokenizer", "layout.boxes_key (the boxes)"))
        raise ValueError(f"{cfg.data.path} holds tokens made with {made}, {preset} is "
                         f"{'text' if tokenizer['kind'] == 'layout' else 'layout'}-to-image: choose a matching preset "
                         f"or rerun jobs.precompute with {rerun}")
    if tokenizer["max_length"] != text.max_length:
        raise ValueError(f"{cfg.data.path} has tokens of length {tokenizer['max_length']}, {preset} reads "
                         f"{text.max_length}: rerun jobs.precompute with that tokenizer max_length or choose a "
                         "matching preset")
    if tokenizer["kind"] == "layout" and tokenizer["num_tokens"] != text.vocab_size:
        raise ValueError(f"{cfg.data.path} has layout tokens of a {tokenizer['num_tokens']}-token vocabulary, {preset} "
                         f"embeds {text.vocab_size}: rerun jobs.precompute with layout.num_tokens={text.vocab_size}")
