"""Structured-config schemas of `python -m jobs.fid_stats` and `python -m jobs.evaluate`.

They live apart from the job modules because jobs/config.py imports every schema, and the job
modules import jobs/config.py (a schema inside a job module would be a circular import).
"""
from dataclasses import dataclass, field

from omegaconf import MISSING

from jobs.evaluate.fid import MetricsConfig
from jobs.evaluate.inception import InceptionConfig
from jobs.metrics import LoggerConfig
from jobs.sample.generate import SamplingConfig
from pipeline.conditions.degradations import DEGRADATIONS, SCALE
from pipeline.conditions.masks import MASK_SETTINGS

DEVICES = ("auto", "cpu", "cuda")


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass
class FidStatsConfig:
    """Reference statistics of an image set (conf/fid_stats.yaml)."""
    reference: str = MISSING          # folder of image shards (*.tar) or of PNG/JPG files
    out: str = MISSING                # the stats folder to write (stats.safetensors + protocol.json)
    max_samples: int | None = None    # the first N images of the sorted set; None: all
    resolution: int | None = None     # resize + centre-crop to this first (the evaluated images' size)
    isc: bool = True                  # also store the logits (IS of the reference set)
    overwrite: bool = False           # replace a cache made with another protocol
    device: str = "auto"              # auto | cpu | cuda
    inception: InceptionConfig = field(default_factory=InceptionConfig)

    def __post_init__(self):
        _check([(self.max_samples is None or self.max_samples >= 2,
                 f"max_samples={self.max_samples}: at least 2 images, or null for all"),
                (self.resolution is None or self.resolution > 0, f"resolution={self.resolution}: positive or null"),
                (self.device in DEVICES, f"device={self.device!r}: one of {DEVICES}")])


@dataclass
class EvaluateConfig:
    """FID / IS / KID / precision-recall of a model or of an image folder (conf/evaluate.yaml)."""
    reference_stats: str | None = None  # a jobs.fid_stats folder (not with inpaint_images: its own originals)
    out_dir: str | None = None        # metrics.json goes here; None: Hydra's run / sweep-point folder
    source: str | None = None         # generate: a run_dir, checkpoint or export (pipeline.models.bundle.load_ldm)
    images: str | None = None         # or evaluate this folder of PNG/JPG (or shards) instead of generating
    weights: str = "ema"              # ema | raw (checkpoints only)
    autoencoder: str | None = None    # override the first stage (pipeline.models.autoencoder spec)
    prompt_file: str | None = None    # text models: one prompt per line; sample i gets line i % count
    class_ids: list[int] | None = None  # class models: sample i gets class_ids[i % count]; None: every class
    hr_images: str | None = None      # super-resolution models: HR images (folder or shards) to degrade,
    #                                   upsample and score (PSNR / SSIM, Tab. 5); jobs/evaluate/sr.py
    degradation: str = "bicubic"      # with hr_images: bicubic | bsr (pipeline.conditions.degradations)
    inpaint_images: str | None = None  # inpainting models: the images to mask, fill and score against
    #                                   (FID + LPIPS, all and the 40-50 % bin, Tab. 7); jobs/evaluate/inpainting.py
    masks: str | None = None          # with inpaint_images: a folder of mask PNGs (white = fill), one per image
    #                                   in sorted order; None: LaMa's eval masks drawn from mask_setting
    mask_setting: str | None = None   # pipeline.conditions.masks setting; None: thick-256 (or thick-512 above 256 px)
    maps: str | None = None           # semantic models: segmentation maps (PNG class ids); sample i gets map
    #                                   i % count; FID against reference_stats (the paper reports none: qualitative)
    layouts: str | None = None        # layout models: a layout latent folder (Tab. 9: the centre-cropped validation
    #                                   set, so each sample's crop tokens match its reference image) or a JSON-lines
    #                                   file of boxes, as jobs.sample; sample i gets layout i % count
    lpips: bool = True                # with inpaint_images: also LPIPS-VGG (needs its weights: lpips_vgg_path, ...)
    lpips_vgg_path: str | None = None   # torchvision's VGG16 file; None: torch hub's cache
    lpips_heads_path: str | None = None  # the LPIPS v0.1 heads; None: the installed lpips package's
    num_samples: int | None = None    # samples to generate; with images=: the first N (None: all)
    seed: int = 0                     # sample i is drawn with seed + i (jobs.sample.generate.seeds_for)
    save_images: bool = False         # also write out_dir/samples/NNNNNN.png (hr_images=: and out_dir/low_res/)
    resolution: int | None = None     # resize + centre-crop before Inception; must equal the reference's
    overwrite: bool = False           # replace an existing out_dir/metrics.json
    device: str = "auto"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    inception: InceptionConfig = field(default_factory=InceptionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logger: LoggerConfig = MISSING    # config group conf/logger/

    def __post_init__(self):
        protocols = [key for key in ("hr_images", "inpaint_images") if getattr(self, key) is not None]
        _check([((self.source is None) != (self.images is None),
                 "set exactly one of source=RUN_OR_EXPORT (generate samples) or images=FOLDER (evaluate a folder)"),
                (self.images is not None or self.num_samples is not None or bool(protocols),
                 "set num_samples=N: how many samples to generate (e.g. 10000 or 50000 for a paper-style FID)"),
                (self.num_samples is None or self.num_samples >= 2, f"num_samples={self.num_samples}: at least 2"),
                (self.num_samples is None or not self.metrics.isc or self.num_samples >= self.metrics.isc_splits,
                 f"num_samples={self.num_samples} < metrics.isc_splits={self.metrics.isc_splits}: IS needs a "
                 "sample per split at least; lower metrics.isc_splits"),
                (self.resolution is None or self.resolution > 0, f"resolution={self.resolution}: positive or null"),
                (self.device in DEVICES, f"device={self.device!r}: one of {DEVICES}"),
                (self.images is None or (self.prompt_file is None and self.class_ids is None and self.maps is None
                                         and self.layouts is None),
                 "images= evaluates a folder as it is: drop prompt_file / class_ids / maps / layouts"),
                (self.hr_images is None or self.source is not None,
                 "hr_images= is the super-resolution protocol: set source=RUN_OR_EXPORT of an SR model"),
                (self.degradation in DEGRADATIONS, f"degradation={self.degradation!r}: one of {DEGRADATIONS}"),
                (len(protocols) <= 1, "hr_images= (super-resolution) and inpaint_images= (inpainting) are two "
                 "protocols: set one"),
                (self.inpaint_images is None or self.source is not None,
                 "inpaint_images= is the inpainting protocol: set source=RUN_OR_EXPORT of an inpainting model"),
                ((self.reference_stats is None) == (self.inpaint_images is not None),
                 "inpaint_images= scores the composites against their own originals: drop reference_stats"
                 if self.inpaint_images is not None else
                 "set reference_stats=FOLDER (make it with `python -m jobs.fid_stats reference=IMAGES out=FOLDER`)"),
                (self.mask_setting is None or self.mask_setting in MASK_SETTINGS,
                 f"mask_setting={self.mask_setting!r}: one of {sorted(MASK_SETTINGS)}, or null for thick at the "
                 "image size"),
                (self.masks is None or self.inpaint_images is not None,
                 "masks= goes with inpaint_images= (the inpainting protocol)"),
                (self.sampling.image_guidance_scale == 0 or (
                    self.hr_images is not None and self.sampling.image_guidance_downsample == SCALE),
                 f"sampling.image_guidance_scale={self.sampling.image_guidance_scale}: jobs.evaluate guides only the "
                 f"super-resolution protocol (Tab. 5's guiding rows: each low-res input is its sample's target): set "
                 f"hr_images= and sampling.image_guidance_downsample={SCALE}, or image_guidance_scale=0")])
