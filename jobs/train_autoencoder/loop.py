"""The first-stage training loop (Sec. 3.1, Eq. 25, App. G): build, train, checkpoint, evaluate.

Why torch DDP and not DeepSpeed: Eq. 25 is a GAN trained with two optimizers stepped one
after the other (autoencoder, then discriminator), and VQGAN's adaptive weight takes
autograd.grad of two losses w.r.t. the decoder's last layer. A DeepSpeed engine owns one
model with one optimizer, and ZeRO-3 would partition the very weight that gradient is
taken for; the first stages are small (kl-f8: 84M parameters), so sharding buys nothing.
DDP wraps the autoencoder; the discriminator (and a learned logvar) sit outside it and
their gradients are averaged with one all-reduce per step.

One step (`train_step`): the autoencoder's loss (L_rec + L_reg - lambda * D(x_rec), the
GAN term only from loss.disc_start on) and its update, then, once the GAN is on, the
discriminator's hinge loss on the same inputs and (detached) reconstructions and its
update, then the EMA. The CompVis code re-runs the autoencoder for the discriminator's
step; reusing the reconstructions saves that forward pass.
"""
import dataclasses
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jobs.checkpointing import (
    CheckpointManager,
    PreemptionHandler,
    capture_rng_state,
    checkpoint_step,
    load_rank_state,
    restore_rng_state,
    save_rank_state,
)
from jobs.distributed import (
    DistInfo,
    all_reduce_mean,
    average_gradients,
    broadcast_object,
    is_distributed,
    print0,
)
from jobs.metrics import Metrics
from jobs.train_autoencoder.config import TrainAutoencoderConfig
from jobs.train_autoencoder.evaluation import evaluate, to_model_input
from ldm.autoencoder.loss import FirstStageLoss
from ldm.autoencoder.lpips import LPIPS
from ldm.autoencoder.model import AutoencoderKL, VQModel
from ldm.diffusion.ema import EMA
from pipeline.image_loader import ImageShardLoader, iter_eval_batches, split_train_eval
from pipeline.models.autoencoder import save_autoencoder
from pipeline.models.weights import load_lpips

STATE_FILE, CONFIG_FILE = "state.pt", "config.json"
PERCEPTUAL_PREFIX = "perceptual_loss."  # frozen LPIPS: rebuilt from its files, never checkpointed


@dataclass
class TrainState:
    """Everything a checkpoint restores besides RNG and data position."""
    model: nn.Module                  # the plain autoencoder; DDP wraps it for the forward
    loss: FirstStageLoss              # discriminator (+ logvar) of Eq. 25
    opt_ae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    ema: EMA | None
    lpips: LPIPS | None               # for the loss and/or the evaluation
    extra_ae_params: list[nn.Parameter]  # trained with the autoencoder but outside DDP (logvar)
    step: int = 0                     # completed optimizer steps


@dataclass
class Run:
    cfg: TrainAutoencoderConfig
    dist: DistInfo
    state: TrainState
    ddp_model: nn.Module
    loader: ImageShardLoader
    eval_shards: list[str]
    ckpt: CheckpointManager
    metrics: Metrics
    last_saved_step: int = -1


def autocast_factory(cfg: TrainAutoencoderConfig, device: torch.device):
    bf16 = cfg.trainer.precision == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def build_model(cfg: TrainAutoencoderConfig) -> nn.Module:
    ae_cfg = cfg.model.autoencoder
    return AutoencoderKL(ae_cfg) if ae_cfg.kind == "kl" else VQModel(ae_cfg, beta=cfg.model.vq_beta)


def build_lpips(cfg: TrainAutoencoderConfig) -> LPIPS | None:
    if cfg.loss.perceptual_weight == 0 and not cfg.eval.lpips:
        return None
    try:
        return load_lpips(cfg.loss.lpips_vgg_path, cfg.loss.lpips_heads_path, cfg.loss.lpips_allow_download)
    except ValueError as err:
        raise ValueError(f"{err}. In this job: loss.lpips_vgg_path, loss.lpips_heads_path, "
                         "loss.lpips_allow_download=true; or no LPIPS at all: loss.perceptual_weight=0 "
                         "eval.lpips=false") from err


def build_state(cfg: TrainAutoencoderConfig, dist_info: DistInfo) -> TrainState:
    """Models and optimizers; the same initial weights on every rank (seeded, built on the CPU)."""
    torch.manual_seed(cfg.seed)
    kind = cfg.model.autoencoder.kind
    model, lpips = build_model(cfg), build_lpips(cfg)
    loss_cfg = cfg.loss.first_stage_loss(kind)
    loss = FirstStageLoss(loss_cfg, lpips if loss_cfg.perceptual_weight > 0 else None)
    model.to(dist_info.device), loss.to(dist_info.device)
    if lpips is not None:
        lpips.to(dist_info.device)
    extra = [loss.logvar] if kind == "kl" and cfg.loss.learn_logvar else []
    lr = cfg.optim.lr(cfg.data.batch_size, dist_info.world_size)
    adam = dict(betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    opt_ae = torch.optim.AdamW(list(model.parameters()) + extra, lr=lr, **adam)
    opt_disc = torch.optim.AdamW(loss.discriminator.parameters(), lr=lr * cfg.optim.disc_lr_mult, **adam)
    ema = EMA(model.named_parameters(), cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None
    return TrainState(model, loss, opt_ae, opt_disc, ema, lpips, extra)


def seed_training_noise(seed: int, rank: int) -> None:
    """Different KL noise on every rank, reproducible for (seed, rank)."""
    mixed = int(np.random.SeedSequence([seed, rank, 1]).generate_state(1)[0])
    random.seed(mixed), np.random.seed(mixed), torch.manual_seed(mixed)


def train_step(state: TrainState, ddp_model: nn.Module, x_BCHW: torch.Tensor, autocast,
               grad_clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One step of Eq. 25 (see module doc) -> (logs of detached scalars, reconstructions)."""
    step, loss = state.step, state.loss
    with autocast():
        x_rec_BCHW, reg = ddp_model(x_BCHW)
        loss_ae, logs = loss.autoencoder_loss(x_BCHW, x_rec_BCHW, reg, step,
                                              last_layer=state.model.decoder.conv_out.weight)
    state.opt_ae.zero_grad(set_to_none=True)
    loss_ae.backward()
    average_gradients(state.extra_ae_params)
    if grad_clip > 0:
        logs["grad_norm"] = nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    state.opt_ae.step()
    if loss.disc_factor_at(step) > 0:  # max over psi in Eq. 25, once the GAN is switched on
        with autocast():
            loss_d, logs_d = loss.discriminator_loss(x_BCHW, x_rec_BCHW, step)
        state.opt_disc.zero_grad(set_to_none=True)  # drops the grads the generator loss left
        loss_d.backward()
        average_gradients(loss.discriminator.parameters())
        state.opt_disc.step()
        logs.update(logs_d)
    if state.ema is not None:
        state.ema.update()
    state.step += 1
    return logs, x_rec_BCHW.detach()


def _loss_state(loss: FirstStageLoss) -> dict[str, torch.Tensor]:
    return {k: v for k, v in loss.state_dict().items() if not k.startswith(PERCEPTUAL_PREFIX)}


def save_checkpoint(run: Run) -> None:
    """model, both optimizers, EMA, step (rank 0); RNG and data position (every rank)."""
    state = run.state
    with run.ckpt.saving(state.step) as folder:
        if run.dist.is_main:
            main = {"step": state.step, "autoencoder": state.model.state_dict(), "loss": _loss_state(state.loss),
                    "opt_ae": state.opt_ae.state_dict(), "opt_disc": state.opt_disc.state_dict()}
            if state.ema is not None:
                main["ema"] = state.ema.state_dict()
            torch.save(main, folder / STATE_FILE)
            (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(run.cfg), indent=2))
        save_rank_state(folder, run.dist.rank, {"rng": capture_rng_state(), "data": run.loader.state_dict()})
    run.last_saved_step = state.step


def _load_loss_state(loss: FirstStageLoss, loss_state: dict[str, torch.Tensor], folder: Path) -> None:
    result = loss.load_state_dict(loss_state, strict=False)
    unexpected_or_missing = result.unexpected_keys + [k for k in result.missing_keys
                                                      if not k.startswith(PERCEPTUAL_PREFIX)]
    if unexpected_or_missing:
        raise ValueError(f"{folder} holds a loss of another configuration ({unexpected_or_missing[:3]}): "
                         "resume with the loss.* settings it was trained with, or set checkpoint.resume=never")


def load_checkpoint(run: Run, folder: Path) -> None:
    state = run.state
    main = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    state.model.load_state_dict(main["autoencoder"])
    _load_loss_state(state.loss, main["loss"], folder)
    state.opt_ae.load_state_dict(main["opt_ae"])
    state.opt_disc.load_state_dict(main["opt_disc"])
    if state.ema is not None:
        state.ema.load_state_dict(main["ema"])
    state.step = run.last_saved_step = int(main["step"])
    rank_state = load_rank_state(folder, run.dist.rank)
    if rank_state is None:
        print0(f"{folder} was written by fewer ranks: RNG and data order restart (not an exact resume)")
        return
    restore_rng_state(rank_state["rng"])
    run.loader.load_state_dict(rank_state["data"])


def reduce_logs(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of every logged scalar (one collective)."""
    keys = sorted(logs)
    values = all_reduce_mean(torch.stack([logs[k].detach().float().reshape(()) for k in keys]))
    return dict(zip(keys, values.tolist()))


class CodeCapture:
    """Keeps the VQ code indices of the last forward (a hook, so DDP's forward stays untouched)."""

    def __init__(self, model: nn.Module):
        self.indices: torch.Tensor | None = None
        quantize = getattr(model, "quantize", None)
        self.handle = quantize.register_forward_hook(self._hook) if quantize is not None else None

    def _hook(self, module, inputs, output) -> None:
        self.indices = output[2].detach()

    def usage(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.indices is None:
            return {}
        return {f"codebook_{k}": v for k, v in model.quantize.usage(self.indices).items()}


class Throughput:
    """img/s and the share of wall time spent waiting for data, between two logs."""

    def __init__(self):
        self.start, self.wait, self.images = time.perf_counter(), 0.0, 0

    def next_batch(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t0
        self.images += batch.shape[0]
        return batch

    def read_and_reset(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"img_per_s": self.images * world_size / elapsed, "data_wait_frac": self.wait / elapsed}
        self.start, self.wait, self.images = time.perf_counter(), 0.0, 0
        return out


def log_step(run: Run, logs: dict[str, torch.Tensor], throughput: Throughput, codes: CodeCapture) -> None:
    """Scalars of this step, averaged over ranks, plus lr, throughput and skipped samples."""
    skipped = torch.tensor([float(v) for v in run.loader.skipped.values()])
    skipped = (all_reduce_mean(skipped.to(run.dist.device)) * run.dist.world_size).tolist()
    scalars = reduce_logs({**logs, **codes.usage(run.state.model)})
    scalars |= {"lr": run.state.opt_ae.param_groups[0]["lr"], **throughput.read_and_reset(run.dist.world_size)}
    scalars |= {f"skipped_{k}": v for k, v in zip(run.loader.skipped, skipped)}
    run.metrics.log(run.state.step, {f"train/{k}": v for k, v in scalars.items()})


def run_evaluation(run: Run) -> dict:
    """Held-out metrics with the EMA weights when there are some; written to JSON and W&B."""
    cfg, state, device = run.cfg, run.state, run.dist.device
    batches = iter_eval_batches(run.eval_shards, cfg.data.resolution, cfg.eval.batch_size, run.dist.rank,
                                run.dist.world_size, cfg.eval.num_images)
    if state.ema is not None:  # evaluate / export the averaged weights
        state.ema.store(state.model)
        state.ema.copy_to(state.model)
    state.model.eval()
    result, grid = evaluate(state.model, batches, device, autocast_factory(cfg, device), state.lpips,
                            cfg.eval.rfid, cfg.eval.inception_weights_path, cfg.eval.num_grid_images)
    state.model.train()
    if state.ema is not None:
        state.ema.restore(state.model)
    result |= {"step": state.step, "weights": "ema" if state.ema is not None else "online"}
    if run.dist.is_main:
        _report_evaluation(run, result, grid)
    return result


def _report_evaluation(run: Run, result: dict, grid: torch.Tensor) -> None:
    """run_dir/eval/step_*.json, the scalars to metrics.jsonl / W&B, the input-over-output grid."""
    step = run.state.step
    path = Path(run.cfg.run_dir) / "eval" / f"step_{step:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    scalars = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and k != "step"}
    run.metrics.log(step, scalars)
    run.metrics.log_images(step, "eval/reconstructions", grid, num_columns=max(len(grid) // 2, 1))


def export(run: Run, scale_factor: float | None) -> Path:
    """The autoencoder (EMA weights if any) in the format precompute loads (formats.md)."""
    cfg, state = run.cfg, run.state
    folder = Path(cfg.export_dir or Path(cfg.run_dir) / "autoencoder")
    if state.ema is not None:  # evaluate / export the averaged weights
        state.ema.store(state.model)
        state.ema.copy_to(state.model)
    source = f"jobs.train_autoencoder:{cfg.run_dir}@step{state.step}"
    save_autoencoder(state.model, cfg.model.autoencoder, folder, scale_factor=scale_factor, source=source)
    if state.ema is not None:
        state.ema.restore(state.model)
    return folder


def _periodic(run: Run, logs, x_BCHW, x_rec_BCHW, throughput: Throughput, codes: CodeCapture) -> None:
    cfg, step = run.cfg, run.state.step
    if step % cfg.logger.log_every == 0 or step == cfg.trainer.max_steps:
        log_step(run, logs, throughput, codes)
    if step % cfg.logger.image_every == 0:
        n = min(cfg.eval.num_grid_images, len(x_BCHW))
        run.metrics.log_images(step, "train/reconstructions", torch.cat([x_BCHW[:n], x_rec_BCHW[:n]]), n)
    if step % cfg.eval.every_steps == 0 and step != cfg.trainer.max_steps:
        run_evaluation(run)
    if step % cfg.checkpoint.every_steps == 0 and step != cfg.trainer.max_steps:
        save_checkpoint(run)
    run.metrics.advance(step, {"loss": float(logs["loss"])} if step % cfg.logger.log_every == 0 else None)


def train_loop(run: Run, preemption: PreemptionHandler) -> bool:
    """Steps until max_steps; True if stopped early by a preemption signal (after saving)."""
    cfg, device = run.cfg, run.dist.device
    autocast, throughput, codes = autocast_factory(cfg, device), Throughput(), CodeCapture(run.state.model)
    batches = iter(run.loader)
    try:
        while run.state.step < cfg.trainer.max_steps:
            x_BCHW = to_model_input(throughput.next_batch(batches), device)
            logs, x_rec_BCHW = train_step(run.state, run.ddp_model, x_BCHW, autocast, cfg.optim.grad_clip)
            _periodic(run, logs, x_BCHW, x_rec_BCHW, throughput, codes)
            if preemption.should_stop(device):
                if run.last_saved_step != run.state.step:
                    save_checkpoint(run)
                print0(f"signal {preemption.received or 'on another rank'}: saved step {run.state.step}, exiting")
                return True
    finally:
        if codes.handle is not None:
            codes.handle.remove()
    return False


def setup_run(cfg: TrainAutoencoderConfig, dist_info: DistInfo) -> Run:
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    state = build_state(cfg, dist_info)
    ddp_model = state.model
    if is_distributed():
        device_ids = [dist_info.device] if dist_info.device.type == "cuda" else None
        # Bucket views as .grad: no gradient copy, and no stride mismatch with the 1x1 attention convs.
        ddp_model = DistributedDataParallel(state.model, device_ids=device_ids, gradient_as_bucket_view=True)
    train_shards, eval_shards = split_train_eval(cfg.data)
    loader = ImageShardLoader(train_shards, cfg.data, dist_info.rank, dist_info.world_size)
    ckpt = CheckpointManager(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint.keep_last)
    resume_dir = broadcast_object(ckpt.resolve_resume(cfg.checkpoint.resume))  # one choice for all ranks
    start_step = checkpoint_step(resume_dir) if resume_dir is not None else 0
    metrics = Metrics(cfg.logger, cfg.run_dir, dataclasses.asdict(cfg), dist_info.is_main,
                      cfg.trainer.max_steps, start_step)
    run = Run(cfg, dist_info, state, ddp_model, loader, eval_shards, ckpt, metrics)
    seed_training_noise(cfg.seed, dist_info.rank)
    if resume_dir is not None:
        load_checkpoint(run, resume_dir)
        print0(f"resumed from {resume_dir} at step {state.step}")
    return run


def run_training(cfg: TrainAutoencoderConfig, dist_info: DistInfo) -> dict:
    """Train, evaluate and export; returns a summary (export_dir on rank 0 only)."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()  # a process-wide flag: put back
    try:
        run = setup_run(cfg, dist_info)
    except BaseException:
        torch.use_deterministic_algorithms(deterministic_before)
        raise
    try:
        with PreemptionHandler() as preemption:
            preempted = train_loop(run, preemption)
        summary = {"step": run.state.step, "preempted": preempted, "run_dir": cfg.run_dir,
                   "skipped": dict(run.loader.skipped)}
        if preempted:
            return summary
        summary["eval"] = run_evaluation(run)
        if run.last_saved_step != run.state.step:
            save_checkpoint(run)
        if dist_info.is_main:
            summary["export_dir"] = str(export(run, summary["eval"]["scale_factor"]))
        return summary
    finally:
        run.metrics.close()
        torch.use_deterministic_algorithms(deterministic_before)
