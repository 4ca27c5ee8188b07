"""The LDM training loop: DeepSpeed ZeRO on latent shards, EMA, checkpoints, NaN skipping, logging.

`train(cfg)` is what `python -m jobs.train` runs, under torchrun / srun or as one process. Progress
is counted in optimizer steps (`step`) and in images (`images_seen`, over all ranks). The per-step
randomness (t, eps, guidance dropout) comes from a generator seeded by (seed, rank, batch index), so
that a resumed run draws exactly what the uninterrupted one did.
"""
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from jobs.checkpointing import (
    PREEMPTED_EXIT_CODE,
    CheckpointManager,
    PreemptionHandler,
    capture_rng_state,
    load_rank_state,
    report_preempted,
    restore_rng_state,
    save_rank_state,
)
from jobs.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    cleanup,
    init_distributed,
    print0,
)
from jobs.metrics import Metrics
from jobs.train.config import TrainConfig, check_tokens
from jobs.train.ema import TrainEMA
from jobs.train.samples import Sampler, build_sampler, sample_grid
from jobs.train.setup import (
    Models,
    autocast,
    build_engine,
    build_models,
    null_input,
    peak_flops,
    train_flops_per_image,
)
from ldm.diffusion.objectives import diffusion_loss
from ldm.presets import PRESETS
from pipeline.conditions.degradations import SCALE
from pipeline.latents.loader import LatentLoader

EMA_FILE, CONFIG_FILE, DEEPSPEED_TAG = "ema.safetensors", "config.yaml", "deepspeed"


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the last good state was written."""


@dataclass
class TrainState:
    step: int = 0              # optimizer steps taken
    images_seen: int = 0       # images of finite micro-batches, all ranks
    num_nonfinite: int = 0     # micro-batches skipped for a non-finite loss, all time
    nonfinite_in_row: int = 0


@dataclass
class Job:
    """Everything the step needs, built once by `setup`."""
    cfg: TrainConfig
    dist: DistInfo
    models: Models
    engine: object             # deepspeed.DeepSpeedEngine around models.module
    ema: TrainEMA
    loader: LatentLoader
    ckpt: CheckpointManager
    metrics: Metrics
    state: TrainState
    flops_per_image: int
    peak_flops: float | None
    sampler: Sampler | None = None
    batches: object = None     # iter(loader)
    last_condition: torch.Tensor | None = None  # the last batch's tau_theta input: prompts of the sample grid


def micro_batch_generator(seed: int, rank: int, batch_index: int, device: torch.device) -> torch.Generator:
    """Randomness of one micro-batch, a pure function of (seed, rank, its index in the rank's stream)."""
    seed_value = int(np.random.SeedSequence([seed, rank, batch_index]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(seed_value)


def condition(job: Job, batch: dict, generator: torch.Generator) -> torch.Tensor | None:
    """What TrainModule gets as `cond`, with classifier-free guidance dropout: each sample's
    condition y (tokens [B, L], class label [B] or stored context [B, L, D]) becomes the empty one
    ("" tokens, the null class, the context of "") with probability model.cond_dropout."""
    encoder = job.models.frozen_conditioner or job.engine.module.conditioner
    if encoder is None:
        return None
    device = job.dist.device
    y = batch[job.cfg.condition_key].to(device)
    if job.cfg.condition_key == "label":
        _check_labels(y, job.models.preset.conditioner.num_classes, job.cfg.model.preset)
    drop_B = torch.rand(len(y), generator=generator, device=device) < job.cfg.model.cond_dropout
    y = torch.where(drop_B.view(-1, *[1] * (y.ndim - 1)), null_input(encoder, y), y)
    if job.models.frozen_conditioner is None:
        return y  # encoded inside the engine: tau_theta trained jointly (Eq. 3)
    with torch.no_grad(), autocast(job.cfg.trainer.precision, device):
        return encoder(y)


def _check_labels(labels_B: torch.Tensor, num_classes: int, preset: str) -> None:
    """Class ids must lie below num_classes: id num_classes is the null class of guidance dropout."""
    if labels_B.numel() and int(labels_B.max()) >= num_classes:
        raise ValueError(f"class label {int(labels_B.max())} in the data, model.preset={preset!r} has {num_classes} "
                         f"classes (0..{num_classes - 1}): choose a preset with more classes or fix the labels")


def train_step(job: Job) -> dict[str, float]:
    """One optimizer step: grad_accum_steps finite micro-batches of Eq. 2 (Eq. 3 when conditional).

    A micro-batch whose loss is non-finite on any rank is dropped before backward on every rank
    (the weights stay the last good ones) and counted; after max_consecutive_nonfinite in a row
    the run stops.
    """
    cfg, engine, device, state = job.cfg, job.engine, job.dist.device, job.state
    preset, losses, wait_s = job.models.preset, [], 0.0
    while len(losses) < cfg.trainer.grad_accum_steps:
        wait_start = time.perf_counter()
        batch = next(job.batches)
        wait_s += time.perf_counter() - wait_start
        generator = micro_batch_generator(cfg.seed, job.dist.rank, job.loader.batches_consumed - 1, device)
        z_0 = batch["z"].to(device)
        cond = condition(job, batch, generator)
        with autocast(cfg.trainer.precision, device):
            loss_B = diffusion_loss(lambda z_t, t_B: engine(z_t, t_B, cond), z_0, job.models.schedule,
                                    objective=cfg.model.objective or preset.objective,
                                    loss_type=cfg.model.loss_type or preset.loss_type,
                                    min_snr_gamma=cfg.model.min_snr_gamma, generator=generator)
        loss = loss_B.mean()
        if any_rank(not bool(torch.isfinite(loss)), device):
            state.num_nonfinite += 1
            state.nonfinite_in_row += 1
            if state.nonfinite_in_row >= cfg.trainer.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{state.nonfinite_in_row} non-finite losses in a row at step {state.step}; the last good "
                    f"state is checkpointed: lower optim.lr, raise trainer.grad_clip or check the latents")
            continue
        state.nonfinite_in_row = 0
        engine.backward(loss)  # DeepSpeed divides by grad_accum_steps
        engine.step()          # clips, steps AdamW and the LR schedule at the accumulation boundary
        losses.append(loss.detach())
        state.images_seen += len(z_0) * job.dist.world_size
    job.last_condition = batch.get(cfg.condition_key) if cfg.condition_key else None
    grad_norm = engine.get_global_grad_norm()
    return {"loss_local": torch.stack(losses).mean(), "data_wait_s": wait_s,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


def setup(cfg: TrainConfig) -> Job:
    dist_info = init_distributed(always_init_process_group=True, device=cfg.trainer.device)
    _check_global_batch(cfg, dist_info.world_size)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    loader = LatentLoader(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size)
    _check_data(cfg, loader)
    first_stage = load_first_stage(cfg, loader.manifest["encoder"]) if cfg.data.condition == "inpainting" else None
    null_context = loader.null_context() if cfg.data.use_context else None
    models = build_models(cfg, dist_info.device, null_context_LD=null_context, first_stage=first_stage)
    engine = build_engine(cfg, models.module, dist_info.world_size)
    ema = TrainEMA(engine.module, cfg.trainer.ema_decay)
    run_dir = Path(cfg.run_dir)
    ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last)
    state = TrainState()
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume)
    if resume_from is not None:
        state = load_checkpoint(resume_from, engine, ema, loader, dist_info)
        print0(f"resumed from {resume_from} at step {state.step}")
    metrics = Metrics(cfg.logger, run_dir, config=asdict(cfg), is_main=dist_info.is_main,
                      total_steps=cfg.trainer.max_steps, start_step=state.step)
    context_length = cfg.model.text_encoder["max_length"] if cfg.data.use_context else None
    job = Job(cfg, dist_info, models, engine, ema, loader, ckpt, metrics, state,
              train_flops_per_image(cfg.model.preset, cfg.model.train_text_encoder, context_length),
              peak_flops(cfg.trainer.peak_tflops, dist_info.device))
    if dist_info.is_main:
        job.sampler = build_sampler(cfg, models, loader.manifest["scale_factor"], dist_info.device)
    job.batches = iter(loader)
    return job


def _check_global_batch(cfg: TrainConfig, world_size: int) -> None:
    batch = cfg.data.batch_size * cfg.trainer.grad_accum_steps * world_size
    if cfg.trainer.global_batch_size not in (None, batch):
        raise ValueError(f"trainer.global_batch_size={cfg.trainer.global_batch_size} but data.batch_size "
                         f"{cfg.data.batch_size} x trainer.grad_accum_steps {cfg.trainer.grad_accum_steps} x "
                         f"{world_size} ranks = {batch}: change data.batch_size or trainer.grad_accum_steps")


def _check_data(cfg: TrainConfig, loader: LatentLoader) -> None:
    """The latents fit the model (pipeline.latents.manifest.check_compatible) and its condition: token
    length, stored-context width (whose text encoder cfg.model.text_encoder then records), classes."""
    preset = PRESETS[cfg.model.preset]
    context_dim = preset.unet.context_dim if cfg.data.use_context else None
    loader.check_compatible(latent_channels=preset.unet.out_channels, latent_size=preset.latent_size,
                            context_dim=context_dim)
    if cfg.condition_key == "tokens":
        check_tokens(cfg, loader.manifest["tokenizer"])
    if cfg.data.use_context:
        _record_text_encoder(cfg, loader.manifest["text_encoder"])
    if cfg.data.condition == "inpainting":
        channels = preset.unet.out_channels + 1
        if preset.conditioner.concat_channels != channels:
            raise ValueError(f"data.condition='inpainting' concatenates the masked image's latent and the mask "
                             f"({channels} channels); model.preset={cfg.model.preset!r} concatenates "
                             f"{preset.conditioner.concat_channels}: choose an inpainting preset "
                             f"(ldm-vq4-inpainting, ldm-vq4-inpainting-big, demo-inpainting)")
    elif cfg.data.condition == "semantic":
        _check_semantic(cfg, preset, loader.manifest)
    elif cfg.data.condition:
        side = loader.manifest["resolution"] // SCALE
        if side != preset.latent_size or preset.conditioner.concat_channels != 3:
            raise ValueError(f"data.condition={cfg.data.condition!r} makes {side}x{side} RGB images from the "
                             f"{loader.manifest['resolution']} px crops of {cfg.data.path}; model.preset="
                             f"{cfg.model.preset!r} concatenates {preset.conditioner.concat_channels} channels at "
                             f"{preset.latent_size}x{preset.latent_size}: precompute at resolution "
                             f"{SCALE * preset.latent_size} with an f=4 autoencoder, or choose a matching preset")
    if loader.classes is not None and len(loader.classes) > preset.conditioner.num_classes:
        raise ValueError(f"data.classes_file={cfg.data.classes_file!r} names {len(loader.classes)} classes, "
                         f"model.preset={cfg.model.preset!r} has {preset.conditioner.num_classes}: choose a preset "
                         f"with enough classes")


def _check_semantic(cfg: TrainConfig, preset, manifest: dict) -> None:
    """The maps' class count is the rescaler's input, and the rescaled map lands on the latent grid."""
    c = preset.conditioner  # a rescaler: TrainConfig checked it
    classes = manifest["images"]["map_classes"]
    if classes != c.rescaler_in_channels:
        raise ValueError(f"{cfg.data.path} holds maps of {classes} classes (precompute's map_classes), model.preset="
                         f"{cfg.model.preset!r} reads {c.rescaler_in_channels}: precompute with map_classes="
                         f"{c.rescaler_in_channels} or choose a matching preset")
    side = manifest["resolution"] // 2 ** c.rescaler_num_stages
    if side != preset.latent_size:
        raise ValueError(f"the {manifest['resolution']} px maps of {cfg.data.path} rescale to {side}x{side}, the "
                         f"latents of model.preset={cfg.model.preset!r} are {preset.latent_size}x{preset.latent_size}: "
                         f"precompute at resolution {preset.latent_size * 2 ** c.rescaler_num_stages}")


def load_first_stage(cfg: TrainConfig, encoder: dict) -> torch.nn.Module:
    """The frozen autoencoder that made the latents (manifest["encoder"]): model.first_stage when set,
    else the source the manifest names; refused unless its weights are the ones that made them."""
    from pipeline.models.autoencoder import load_autoencoder

    kind, _, where = encoder["source"].partition(":")
    spec, preset = (where.rsplit(":", 1) if kind == "compvis" else (where, None))
    spec = cfg.model.first_stage or spec
    try:
        model, _, identity = load_autoencoder(spec, preset if not cfg.model.first_stage else None)
    except (ValueError, OSError) as err:
        raise ValueError(f"inpainting encodes masked images with the latents' first stage, which did not load "
                         f"from {spec!r} ({err}): set model.first_stage=<its folder or spec>") from err
    if identity["sha256"] != encoder["sha256"]:
        raise ValueError(f"model.first_stage {spec!r} has weights sha256 {identity['sha256'][:12]}..., the latents in "
                         f"{cfg.data.path} were made with {encoder['sha256'][:12]}... ({encoder['source']}): set "
                         f"model.first_stage to the autoencoder that made them")
    return model


def _record_text_encoder(cfg: TrainConfig, text_encoder: dict) -> None:
    """Checkpoints keep the resolved config: name the frozen text encoder a sampler must run on prompts."""
    pinned = cfg.model.text_encoder
    if pinned and pinned.get("sha256") != text_encoder["sha256"]:
        raise ValueError(f"model.text_encoder names weights sha256 {str(pinned.get('sha256'))[:12]}..., the latents "
                         f"in {cfg.data.path} were made with {text_encoder['sha256'][:12]}... "
                         f"({text_encoder['kind']} {text_encoder.get('arch') or text_encoder.get('name_or_path')}): "
                         f"use latents of that encoder or unset model.text_encoder")
    cfg.model.text_encoder = dict(text_encoder)


def save_checkpoint(job: Job) -> None:
    """Model, optimizer, LR schedule (DeepSpeed), EMA, RNG and data position of every rank, config."""
    full_ema = job.ema.full_state_dict()  # a collective under ZeRO-3: before rank 0 writes
    with job.ckpt.saving(job.state.step) as tmp_dir:
        job.engine.save_checkpoint(str(tmp_dir), tag=DEEPSPEED_TAG, client_state={"train_state": asdict(job.state)})
        rank_state = {"rng": capture_rng_state(), "data": job.loader.state_dict()}
        if job.ema.partitioned:
            rank_state["ema"] = job.ema.local_state_dict()
        save_rank_state(tmp_dir, job.dist.rank, rank_state)
        if job.dist.is_main:
            save_file({k: v.contiguous() for k, v in full_ema.items()}, str(tmp_dir / EMA_FILE))
            (tmp_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(job.cfg)))


def load_checkpoint(folder: Path, engine, ema: TrainEMA, loader: LatentLoader, dist_info: DistInfo) -> TrainState:
    _, client_state = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    rank_state = load_rank_state(folder, dist_info.rank)
    if rank_state is None:
        raise ValueError(f"{folder} has no state for rank {dist_info.rank}: resume with the world size it was "
                         f"written with, or set checkpoint.resume=never")
    if ema.partitioned:
        ema.load_local_state_dict(rank_state["ema"])
    else:
        ema.load_full_state_dict(load_file(str(folder / EMA_FILE)))
    loader.load_state_dict(rank_state["data"])
    restore_rng_state(rank_state["rng"])
    return TrainState(**client_state["train_state"])


def step_scalars(job: Job, out: dict, step_s: float, wait_s: float, num_images: int) -> dict[str, float]:
    """What one log record holds; `num_images`/`step_s`/`wait_s` cover the steps since the last log."""
    img_per_s = num_images / max(step_s, 1e-9)
    scalars = {"loss": float(all_reduce_mean(out["loss_local"])), "lr": job.engine.get_lr()[0],
               "grad_norm": out["grad_norm"], "img_per_s": img_per_s, "data_wait_frac": wait_s / max(step_s, 1e-9),
               "images_seen": job.state.images_seen, "num_nonfinite": job.state.num_nonfinite}
    if job.peak_flops:  # MFU: FLOPs per image counted once (flop_counter), over the peak of all devices
        scalars["mfu"] = img_per_s * job.flops_per_image / (job.peak_flops * job.dist.world_size)
    scalars["memory_gib"] = _memory_bytes(job.dist.device) / 2**30
    return scalars


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS (Linux: KiB)


def log_samples(job: Job) -> None:
    generator = torch.Generator(job.dist.device).manual_seed(job.cfg.seed)
    images = sample_grid(job.cfg, job.models, job.ema, job.sampler, job.last_condition, generator)
    if images is not None:
        job.metrics.log_images(job.state.step, "samples", images, num_columns=min(8, len(images)))


def run(job: Job, preemption: PreemptionHandler) -> int:
    """Steps until max_steps (or a signal / stop_after_steps); returns the process exit code."""
    cfg, state = job.cfg, job.state
    last_stop = cfg.trainer.stop_after_steps or cfg.trainer.max_steps
    window = {"step_s": 0.0, "wait_s": 0.0, "images": 0}
    while state.step < min(cfg.trainer.max_steps, last_stop):
        start, images_before = time.perf_counter(), state.images_seen
        try:
            out = train_step(job)
        except NonFiniteLossError:
            save_checkpoint(job)
            raise
        state.step += 1
        job.ema.update()
        window["step_s"] += time.perf_counter() - start
        window["wait_s"] += out["data_wait_s"]
        window["images"] += state.images_seen - images_before
        if state.step % cfg.logger.log_every == 0:
            scalars = step_scalars(job, out, window["step_s"], window["wait_s"], window["images"])
            job.metrics.log(state.step, scalars)
            job.metrics.advance(state.step, {"loss": scalars["loss"]})
            window = {"step_s": 0.0, "wait_s": 0.0, "images": 0}
        if state.step % cfg.logger.image_every == 0:
            log_samples(job)
        done = state.step == cfg.trainer.max_steps
        if state.step % cfg.checkpoint.every_steps == 0 or done:
            save_checkpoint(job)
        if not done and preemption.should_stop(job.dist.device):
            if state.step % cfg.checkpoint.every_steps:
                save_checkpoint(job)
            print0(f"signal {preemption.received}: checkpointed step {state.step}, exiting for requeue")
            report_preempted(job.dist.rank)
            return PREEMPTED_EXIT_CODE
    return 0


def train(cfg: TrainConfig) -> int:
    """Build everything from `cfg`, train, and tear down; returns the exit code (0, or 75 when preempted)."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.trainer.deterministic)
    job = None
    try:
        job = setup(cfg)
        with PreemptionHandler() as preemption:
            return run(job, preemption)
    finally:
        if job is not None:
            job.metrics.close()
        torch.use_deterministic_algorithms(deterministic_before)
        cleanup()  # through deepspeed.comm, which also drops DeepSpeed's cached groups
