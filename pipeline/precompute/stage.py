"""Precompute: image shards -> latent shards + manifest.json with a frozen autoencoder, on Ray.

Encoding every image once, before training, is what makes latent diffusion cheap at scale
(Sec. 3.2: "z_t can be efficiently obtained from E during training"). The stage:
1. loads the autoencoder on the driver (a bad path fails here, before Ray starts) and checks that
   `output_dir` holds nothing made with other settings;
2. runs one CPU task per unfinished input shard (pipeline.precompute.shard.process_shard): it
   decodes and crops the images and sends uint8 batches to the encoder actors, one per GPU (or
   `num_cpu_encoders` CPU actors on a cluster without GPUs), then writes the shard atomically;
3. writes manifest.json: encoder identity, per-shard counts, skipped samples by reason and the
   latent scale factor (App. G: the autoencoder's own, or 1 / std of the latents).
With `text_encoder.kind` set, the encoder actors also run a frozen text encoder (OpenCLIP or HF
CLIP) on the tokenized captions and each sample keeps its context [L, D] (KEY.context.npy); the
folder gets `null_context.npy`, the context of the empty caption that classifier-free guidance
trains with, and the manifest names the encoder (pipeline.models.text_encoder) and its tokenizer.
With `layout.boxes_key` set, KEY.tokens.npy holds each crop's layout tokens instead of caption tokens
(pipeline.conditions.layouts: the boxes of KEY.json, App. E.2.1); the manifest's tokenizer is
{"kind": "layout", ...} and its `layout` entry counts the boxes dropped; a sample with malformed boxes
is skipped and counted ("bad_boxes").

Exactly once: output shards are a pure function of their input shard and the settings, written
under a temp name and renamed, then marked finished; a rerun skips finished shards. A killed
shard task is retried by Ray (`max_retries`); a killed encoder actor is restarted and its
pending calls re-sent (`max_restarts`, `max_task_retries`). So every input sample that is kept
appears exactly once, whatever dies along the way.

On a cluster of several nodes, input_dir, output_dir and a file or folder autoencoder must be on
a file system every node sees: tasks read and write shards, and each actor loads the weights.
"""
import collections
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.autoencoder.config import latent_shape
from ldm.diffusion.tokenizers import TOKENIZER_KINDS, build_tokenizer
from pipeline.conditions.layouts import LayoutConfig
from pipeline.latents.manifest import (
    build_manifest,
    estimate_scale_factor,
    write_manifest,
)
from pipeline.models.autoencoder import load_autoencoder
from pipeline.models.text_encoder import (
    TextEncoderConfig,
    load_text_encoder,
    load_text_encoder_for_latents,
    write_null_context,
)
from pipeline.precompute.shard import (
    CROPS,
    ImagePolicy,
    encode_batch,
    encode_text_batch,
    process_shard,
    read_finished,
    shard_paths,
)
from pipeline.ray_cluster import RayConfig, init_ray
from pipeline.shards import atomic_write_json, iter_samples

ENCODE_DTYPES = {"auto": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = ("float16", "float32")


@dataclass
class TokenizerConfig:
    kind: str | None = None          # None: no tokens; else one of ldm.diffusion.tokenizers.TOKENIZER_KINDS
    name_or_path: str | None = None  # hub id or folder (bert, hf_clip); None for openclip
    max_length: int = 77


@dataclass
class PrecomputeConfig:
    input_dir: str = ""               # image shards in img2dataset layout (jobs.ingest's output_dir)
    output_dir: str = ""
    autoencoder: str = ""             # our folder | diffusers folder or hub id | CompVis .ckpt/.safetensors
    autoencoder_preset: str | None = None     # CompVis files only: their AUTOENCODER_PRESETS name
    autoencoder_subfolder: str | None = None  # diffusers only, e.g. "vae" of a pipeline on the hub
    resolution: int = 256
    crop: str = "center"              # center | random (offset drawn from seed, shard and key)
    min_crop_fraction: float = 1.0    # the square's side: shorter side x U(min, max) per key (SR: 0.5, 1.0)
    max_crop_fraction: float = 1.0
    resize_filter: str = "bicubic"    # bicubic | area (box averaging, the SR sets' HR images)
    keep_images: bool = False         # KEY.image.png: the crop the encoder saw (SR's HR image, inpainting's)
    map_classes: int | None = None    # keep KEY.seg.png (ingest map_col), cropped as its image, ids < this
    seed: int = 0
    batch_size: int = 32              # images per encoder call
    encode_dtype: str = "auto"        # autocast dtype; auto: bfloat16 on GPU, float32 on CPU
    dtype: str = "float16"            # dtype of the stored moments / latents
    num_cpu_encoders: int = 1         # encoder actors when the cluster has no GPU
    cpu_encoder_threads: int = 1      # torch threads (and Ray CPUs) of each CPU encoder actor
    max_inflight_batches: int = 2     # per shard task: decode the next batch while one is encoded
    scale_factor: float | None = None  # None: the autoencoder's own, else 1/std (KL) or 1.0 (VQ)
    estimate_scale_factor: bool = False  # True: always estimate 1/std (App. G), over num_scale_samples
    num_scale_samples: int = 1000
    max_retries: int = 3              # Ray retries of a dead shard task, restarts of a dead encoder
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # KEY.context.npy when set
    layout: LayoutConfig = field(default_factory=LayoutConfig)  # KEY.tokens.npy of each crop's boxes when set
    ray: RayConfig = field(default_factory=RayConfig)
    fail_once_marker: str | None = None  # tests only: the shard task that creates this file dies mid-shard

    def __post_init__(self):
        checks = [(bool(self.input_dir), "set input_dir to the folder of image shards (jobs.ingest's output_dir)"),
                  (bool(self.output_dir), "set output_dir to the folder for the latent shards"),
                  (bool(self.autoencoder), "set autoencoder to a folder, hub id or CompVis checkpoint"),
                  (self.crop in CROPS, f"crop must be one of {CROPS}"),
                  (self.encode_dtype in ENCODE_DTYPES, f"encode_dtype must be one of {tuple(ENCODE_DTYPES)}"),
                  (self.dtype in STORAGE_DTYPES, f"dtype must be one of {STORAGE_DTYPES}"),
                  (self.tokenizer.kind in (None, *TOKENIZER_KINDS), f"tokenizer.kind must be null or one of "
                                                                    f"{TOKENIZER_KINDS}"),
                  (self.scale_factor is None or self.scale_factor > 0, "scale_factor must be positive or null"),
                  (min(self.resolution, self.batch_size, self.num_cpu_encoders, self.cpu_encoder_threads,
                       self.max_inflight_batches, self.num_scale_samples) > 0,
                   "resolution, batch_size, num_cpu_encoders, cpu_encoder_threads, max_inflight_batches and "
                   "num_scale_samples must be positive"),
                  (self.max_retries >= 0, "max_retries must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._check_tokenizer_matches_text_encoder()
        self._check_layout()
        image_policy(self)  # checks the crop fractions and the resize filter

    def _check_layout(self) -> None:
        if self.layout.boxes_key is not None and (self.tokenizer.kind or self.text_encoder.kind):
            raise ValueError(f"layout.boxes_key={self.layout.boxes_key!r} stores layout tokens in KEY.tokens.npy, "
                             "which then cannot hold caption tokens too: unset tokenizer.kind and text_encoder.kind")

    def _check_tokenizer_matches_text_encoder(self) -> None:
        tok = self.tokenizer
        if not (self.text_encoder.kind and tok.kind):
            return
        implied = self.text_encoder.tokenizer(tok.max_length)
        if (tok.kind, tok.name_or_path) != (implied["kind"], implied["name_or_path"]):
            raise ValueError(f"tokenizer.kind={tok.kind} tokenizer.name_or_path={tok.name_or_path} is not the "
                             f"tokenizer of text_encoder.kind={self.text_encoder.kind} (kind={implied['kind']}, "
                             f"name_or_path={implied['name_or_path']}): unset tokenizer.kind, the text encoder "
                             "implies its own tokenizer")

    def resolved_tokenizer(self) -> dict | None:
        """The tokenizer of KEY.tokens.npy (and of the text encoder's input), as the manifest records it."""
        if self.layout.boxes_key is not None:
            return self.layout.spec()
        if self.text_encoder.kind:
            return self.text_encoder.tokenizer(self.tokenizer.max_length)
        return dataclasses.asdict(self.tokenizer) if self.tokenizer.kind else None


def _check_unchanged(what: str, found: str, expected: str) -> None:
    if found != expected:
        raise ValueError(f"the {what} changed while precompute ran (sha256 {found[:12]}..., the driver loaded "
                         f"{expected[:12]}...)")


class EncoderWorker:
    """The frozen first stage (and text encoder, if any) on one device, as a Ray actor (one per GPU, or on CPUs).

    Each actor loads the encoders itself (the cluster shares the file system that holds the
    shards) and checks that they are the ones the driver loaded (`expected_sha256`: "autoencoder",
    "text_encoder"); so a restarted actor needs nothing from the object store.
    """

    def __init__(self, cfg: PrecomputeConfig, expected_sha256: dict[str, str | None]):
        model, _, identity = load_autoencoder(cfg.autoencoder, cfg.autoencoder_preset, cfg.autoencoder_subfolder)
        _check_unchanged(f"autoencoder at {cfg.autoencoder}", identity["sha256"], expected_sha256["autoencoder"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.text_encoder = None
        if cfg.text_encoder.kind:
            text_encoder, text_identity = load_text_encoder(cfg.text_encoder)
            _check_unchanged("text encoder", text_identity["sha256"], expected_sha256["text_encoder"])
            self.text_encoder = text_encoder.to(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_encoder_threads)
        else:
            torch.backends.cudnn.benchmark = True  # one input shape: pick the fastest conv kernels once
            self.model.to(memory_format=torch.channels_last)  # the layout tensor cores want
        auto = torch.bfloat16 if self.device.type == "cuda" else None
        self.autocast_dtype = auto if cfg.encode_dtype == "auto" else ENCODE_DTYPES[cfg.encode_dtype]
        self.out_dtype = cfg.dtype

    def encode(self, images_B3HW: np.ndarray) -> np.ndarray:
        return encode_batch(self.model, images_B3HW, autocast_dtype=self.autocast_dtype, out_dtype=self.out_dtype)

    def encode_text(self, tokens_BL: np.ndarray) -> np.ndarray:
        return encode_text_batch(self.text_encoder, tokens_BL, autocast_dtype=self.autocast_dtype)

    def pid(self) -> int:
        return os.getpid()


def actor_encoder(ray, encoders: list, first: int, window: int, method: str = "encode"):
    """`encode_chunks` over Ray actors' `method`: round-robin from `first`, at most `window` batches in flight."""
    def encode_chunks(chunks):
        pending = collections.deque()
        for i, chunk in enumerate(chunks):
            pending.append(getattr(encoders[(first + i) % len(encoders)], method).remote(chunk))
            if len(pending) >= window:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    return encode_chunks


def _dies_once(encode_chunks, marker: str):
    """Test hook (`fail_once_marker`): the first shard task to create `marker` ends its worker process
    with os._exit once its second batch is encoded, as a worker killed mid-shard; Ray retries the task."""
    def encode(chunks):
        for i, encoded in enumerate(encode_chunks(chunks)):
            if i == 1:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    os._exit(1)
                except FileExistsError:
                    pass
            yield encoded
    return encode


def caption_tokenizer(cfg: PrecomputeConfig):
    """The captions' tokenizer (texts -> [B, L]), or None: no caption tokens (none configured, or layout tokens)."""
    tok = cfg.resolved_tokenizer()
    if tok is None or tok["kind"] == "layout":
        return None
    return build_tokenizer(tok["kind"], tok["name_or_path"], tok["max_length"])


def image_policy(cfg: PrecomputeConfig) -> ImagePolicy:
    return ImagePolicy(cfg.resolution, cfg.crop, cfg.seed, cfg.min_crop_fraction, cfg.max_crop_fraction,
                       cfg.resize_filter, cfg.keep_images, cfg.map_classes)


def image_settings(cfg: PrecomputeConfig) -> dict:
    """How the images were cut, for settings.json and the manifest."""
    return {"min_crop_fraction": cfg.min_crop_fraction, "max_crop_fraction": cfg.max_crop_fraction,
            "resize_filter": cfg.resize_filter, "keep_images": cfg.keep_images, "map_classes": cfg.map_classes}


def _shard_task(source: str, cfg: PrecomputeConfig, encoders: list, first: int) -> dict:
    import ray

    tokenize = caption_tokenizer(cfg)
    policy = image_policy(cfg)
    encode_chunks = actor_encoder(ray, encoders, first, cfg.max_inflight_batches)
    if cfg.fail_once_marker:
        encode_chunks = _dies_once(encode_chunks, cfg.fail_once_marker)
    encode_text = None
    if cfg.text_encoder.kind:
        encode_text = actor_encoder(ray, encoders, first, cfg.max_inflight_batches, method="encode_text")
    return process_shard(Path(source), Path(cfg.output_dir), policy, cfg.batch_size, encode_chunks, tokenize,
                         encode_text, cfg.layout if cfg.layout.boxes_key is not None else None)


def start_encoders(ray, cfg: PrecomputeConfig, encoder_sha256: dict[str, str | None], run_id: str) -> list:
    """One actor per GPU of the cluster, else `num_cpu_encoders` CPU actors; named `{run_id}-encoder-{i}`."""
    num_gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1, "num_cpus": 1} if num_gpus else {"num_cpus": cfg.cpu_encoder_threads}
    options = dict(max_restarts=cfg.max_retries, max_task_retries=cfg.max_retries, **resources)
    return [ray.remote(EncoderWorker).options(name=f"{run_id}-encoder-{i}", **options).remote(cfg, encoder_sha256)
            for i in range(num_gpus or cfg.num_cpu_encoders)]


def run_shards(ray, cfg: PrecomputeConfig, todo: list[Path], encoder_sha256: dict[str, str | None]) -> list[dict]:
    """One retried Ray task per shard, progress bar over samples; returns the new shards' stats."""
    from tqdm import tqdm

    encoders = start_encoders(ray, cfg, encoder_sha256, f"precompute-{time.time_ns()}")
    task = ray.remote(_shard_task).options(num_cpus=1, max_retries=cfg.max_retries)
    pending = [task.remote(str(p), cfg, encoders, i) for i, p in enumerate(todo)]
    stats, start = [], time.perf_counter()
    try:
        with tqdm(total=len(pending), desc="precompute", unit="shard") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                stats += ray.get(done)
                samples = sum(s["count"] for s in stats)
                bar.set_postfix(samples=samples, img_per_s=f"{samples / (time.perf_counter() - start):.1f}")
                bar.update(len(done))
    finally:
        for encoder in encoders:
            ray.kill(encoder)
    return stats


def input_shards(cfg: PrecomputeConfig) -> list[Path]:
    shards = sorted(Path(cfg.input_dir).glob("*.tar"))
    if not shards:
        raise ValueError(f"input_dir={cfg.input_dir!r} holds no .tar image shards; point it at jobs.ingest's "
                         "output_dir")
    return shards


def check_settings(cfg: PrecomputeConfig, identity: dict, text_identity: dict | None) -> None:
    """A rerun must use the settings the finished shards were made with (else they would mix);
    before any shard is finished, new settings replace the old ones."""
    settings = {"input_dir": str(Path(cfg.input_dir).resolve()), "encoder_sha256": identity["sha256"],
                "resolution": cfg.resolution, "crop": cfg.crop, "seed": cfg.seed, "dtype": cfg.dtype,
                "tokenizer": cfg.resolved_tokenizer() or dataclasses.asdict(cfg.tokenizer),
                "text_encoder": text_identity, "images": image_settings(cfg)}
    path = Path(cfg.output_dir) / "_work" / "settings.json"
    if path.is_file() and any(path.parent.glob("[0-9]*.json")):
        before = json.loads(path.read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise ValueError(f"output_dir={cfg.output_dir!r} holds latents made with other {changed} "
                             f"({[before.get(k) for k in changed]} vs {[settings[k] for k in changed]}); "
                             "choose another output_dir or delete that one")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def _stored_latents(out_dir: Path, stats: list[dict]):
    for shard in sorted((s for s in stats if s["count"]), key=lambda s: s["name"]):
        for sample in iter_samples(shard_paths(out_dir, shard["name"])["tar"]):
            yield np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)


def resolve_scale_factor(cfg: PrecomputeConfig, identity: dict, stats: list[dict]) -> tuple[float, str]:
    """(scale factor, "config" | "estimated"): App. G rescales the latents to unit variance."""
    if cfg.scale_factor is not None:
        return cfg.scale_factor, "config"
    if not cfg.estimate_scale_factor and identity.get("scale_factor") is not None:
        return identity["scale_factor"], "config"
    if not cfg.estimate_scale_factor and identity["kind"] == "vq":
        return 1.0, "config"  # VQ latents: the released VQ-LDMs train on them unscaled
    storage = "moments" if identity["kind"] == "kl" else "latents"
    latents = _stored_latents(Path(cfg.output_dir), stats)
    return estimate_scale_factor(latents, storage, cfg.num_scale_samples, cfg.seed), "estimated"


def summarize(new: list[dict], manifest: dict, num_inputs: int, seconds: float) -> dict:
    samples, written = sum(s["count"] for s in new), sum(s["bytes"] for s in new)
    skipped = {r: sum(s["skipped"][r] for s in new) for r in manifest["skipped"]}
    return {"input_shards": num_inputs, "shards_encoded": len(new), "shards_already_done": num_inputs - len(new),
            "samples": samples, "skipped": skipped, "bytes_written": written,
            "bytes_per_sample": round(written / max(samples, 1), 1), "seconds": round(seconds, 2),
            "samples_per_s": round(samples / max(seconds, 1e-9), 2), "num_samples_total": manifest["num_samples"],
            "skipped_total": manifest["skipped"], "scale_factor": manifest["scale_factor"],
            "scale_factor_source": manifest["scale_factor_source"], "layout_total": manifest["layout"]}


def precompute(cfg: PrecomputeConfig) -> dict:
    """Run (or resume) the stage; writes manifest.json and returns the summary of this run."""
    start = time.perf_counter()
    inputs = input_shards(cfg)
    _, ae_cfg, identity = load_autoencoder(cfg.autoencoder, cfg.autoencoder_preset, cfg.autoencoder_subfolder)
    if cfg.resolution % ae_cfg.downsample_factor:
        raise ValueError(f"resolution={cfg.resolution}: set it to a multiple of the autoencoder's downsampling "
                         f"factor f={ae_cfg.downsample_factor}")
    shape = latent_shape(ae_cfg, cfg.resolution, cfg.resolution)
    tok = cfg.resolved_tokenizer()
    tokenize = caption_tokenizer(cfg)  # a bad tokenizer name fails here, not in every shard task
    text_model, text_encoder = None, None
    if cfg.text_encoder.kind:  # loaded on the driver too: a bad spec fails here, before Ray starts
        text_model, text_encoder = load_text_encoder_for_latents(cfg.text_encoder, cfg.tokenizer.max_length)
    check_settings(cfg, identity, text_encoder)
    if text_model is not None:
        write_null_context(cfg.output_dir, text_model, tokenize)
        del text_model  # the actors load their own copy
    todo = [p for p in inputs if read_finished(cfg.output_dir, p.name) is None]
    shas = {"autoencoder": identity["sha256"], "text_encoder": text_encoder and text_encoder["sha256"]}
    new = run_shards(init_ray(cfg.ray), cfg, todo, shas) if todo else []
    stats = [read_finished(cfg.output_dir, p.name) for p in inputs]
    scale_factor, scale_source = resolve_scale_factor(cfg, identity, stats)
    manifest = build_manifest(encoder=identity, resolution=cfg.resolution, crop=cfg.crop, dtype=cfg.dtype,
                              latent_shape=list(shape), scale_factor=scale_factor, scale_factor_source=scale_source,
                              shards=stats, tokenizer=tok, text_encoder=text_encoder, images=image_settings(cfg))
    write_manifest(cfg.output_dir, manifest)
    return summarize(new, manifest, len(inputs), time.perf_counter() - start)
