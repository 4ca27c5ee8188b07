"""Structured-config schema of `python -m jobs.sample` (conf/sample.yaml).

What to sample from (`source`, `weights`, `autoencoder`), what to condition on (exactly one of
`prompts`, `prompt_file`, `class_ids`, `images` [+ `masks`], `maps`, `layouts`, or nothing for unconditional models with
`num_samples`; `guide_images` adds image guiding to any of them), how many (`num_per_prompt` per condition), which global indices (`indices`, default
all), where (`out_dir`), and how (`sampling`, jobs.sample.generate.SamplingConfig). Checks that need no
model run here and raise ValueError naming the key; the model-dependent ones run before any sampling.
"""
from dataclasses import dataclass, field

from omegaconf import MISSING

from jobs.sample.generate import SamplingConfig

WEIGHTS = ("ema", "raw")


@dataclass
class SampleConfig:
    source: str = MISSING                # an export folder, a training checkpoint folder or a training run_dir
    out_dir: str = MISSING               # NNNNNN.png per global index, grid.png, samples.json
    weights: str = "ema"                 # ema | raw (training checkpoints)
    autoencoder: str | None = None       # override the first stage (pipeline.models.autoencoder spec)
    prompts: list[str] | None = None     # text models
    prompt_file: str | None = None       # text models: one prompt per line (blank lines skipped)
    class_ids: list[int] | None = None   # class-conditional models
    images: str | None = None            # SR: low-res inputs; inpainting: images to complete (a file or folder)
    masks: str | None = None             # inpainting: masks (white = generate), same count and order as images
    maps: str | None = None              # semantic: segmentation maps (8-bit grey PNG of class ids; a file or folder)
    layouts: str | None = None           # layout-to-image: a JSON-lines file, one list of boxes per line, each
                                         # {"category": int, "bbox": [x0, y0, w, h] in [0, 1], "is_group_of": bool};
                                         # or a layout latent folder (precompute layout.boxes_key): its stored tokens
    guide_images: str | None = None      # image guiding (App. C): one target per condition (per row alone when
                                         # unconditional), with sampling.image_guidance_scale > 0
    classifier: str | None = None        # classifier guidance (App. D.4, LDM-8-G): a jobs.train_classifier out_dir,
                                         # with sampling.classifier_scale > 0 (class-conditional models, class_ids)
    lpips_vgg_path: str | None = None    # sampling.image_guidance_loss=lpips: torchvision's VGG16 file; None: hub cache
    lpips_heads_path: str | None = None  # ... and the LPIPS v0.1 heads; None: the installed lpips package's
    num_per_prompt: int = 4              # samples per prompt / class / image
    num_samples: int | None = None       # unconditional models: how many samples
    seed: int = 0                        # sample seed = seed + global index
    indices: list[int] | None = None     # only these global indices (regenerate single samples); None: all
    device: str = "auto"                 # auto | cpu | cuda
    grid_max: int = 64                   # at most this many samples in grid.png (the lowest indices)
    progress_bar: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def given_conditions(self) -> list[str]:
        return [k for k in ("prompts", "prompt_file", "class_ids", "images", "maps", "layouts")
                if getattr(self, k) is not None]

    def __post_init__(self):
        given = self.given_conditions()
        checks = [
            (len(given) <= 1, f"set only one of prompts, prompt_file, class_ids, images, maps, layouts (got {given})"),
            (self.masks is None or self.images is not None, "masks=... needs images=... (the images to inpaint)"),
            (self.weights in WEIGHTS, f"weights={self.weights!r}: use one of {WEIGHTS}"),
            (self.num_per_prompt >= 1, f"num_per_prompt={self.num_per_prompt}: must be >= 1"),
            (self.num_samples is None or self.num_samples >= 1, f"num_samples={self.num_samples}: must be >= 1"),
            (self.num_samples is None or not given,
             f"num_samples is for unconditional models; with {given[0] if given else ''} use num_per_prompt"),
            (self.num_samples is None or self.guide_images is None,
             "num_samples and guide_images are both set: with guide_images each target makes num_per_prompt samples"),
            ((self.guide_images is None) == (self.sampling.image_guidance_scale == 0),
             f"guide_images={self.guide_images!r} with sampling.image_guidance_scale="
             f"{self.sampling.image_guidance_scale}: image guiding needs both (targets and a scale > 0), or neither"),
            ((self.classifier is None) == (self.sampling.classifier_scale == 0),
             f"classifier={self.classifier!r} with sampling.classifier_scale={self.sampling.classifier_scale}: "
             "classifier guidance needs both (a classifier and a scale > 0; LDM-8-G uses 10), or neither"),
            (self.seed >= 0, f"seed={self.seed}: must be >= 0"),
            (self.indices is None or (self.indices and min(self.indices) >= 0),
             f"indices={self.indices}: non-negative global sample indices"),
            (self.device in ("auto", "cpu", "cuda"), f"device={self.device!r}: auto, cpu or cuda"),
            (self.grid_max >= 0, f"grid_max={self.grid_max}: must be >= 0 (0: no grid)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
