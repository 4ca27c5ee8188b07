"""`python -m jobs.train_classifier source=LDM data.path=LATENTS out_dir=DIR max_steps=N`: the classifier of noisy
latents that guides the LDM-8-G samples (App. D.4, Tab. 10; jobs.sample classifier=DIR sampling.classifier_scale=10).

    python -m jobs.train_classifier source=runs/cin-ldm8 data.path=/data/imagenet/latents \
        out_dir=classifiers/cin-ldm8 max_steps=300000 data.batch_size=256 precision=bf16

As the released `NoisyLatentImageClassifier`: the LDM stays frozen (here only its preset's UNet config, noise
schedule and latent scale factor are used); each step draws t ~ U{0..T-1} per sample and eps, forms
z_t = q_sample(z_0, t, eps) (the latents as the LDM sees them, App. G) and takes one AdamW step of the
cross-entropy of the classifier's logits(z_t, t) against the labels. One process (a classifier is a
fraction of the LDM's cost); a JSON line (loss, accuracy on the training batches) every log_every steps.

Resume is exact: out_dir holds the optimizer state and torch's RNG besides the weights (jobs/train_classifier/
checkpoint.py), batch k's t and eps come from a generator seeded by (seed, k), and the loader continues after
the last batch consumed; a rerun with resume=auto continues from out_dir's last save.
"""
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from jobs.config import hydra_main
from jobs.distributed import launcher_env, print0
from jobs.train.loop import micro_batch_generator
from jobs.train.setup import autocast
from jobs.train_classifier import checkpoint
from jobs.train_classifier.config import TrainClassifierConfig
from ldm.diffusion.classifier import LatentClassifier, encoder_config
from pipeline.latents.loader import LatentLoader

# Keys a resumed run may change: they do not change what the steps compute.
RESUMABLE_CHANGES = ("max_steps", "log_every", "checkpoint_every", "resume", "device", "data.num_workers",
                     "data.prefetch_factor", "data.pin_memory")


@dataclass
class Job:
    cfg: TrainClassifierConfig
    bundle: object                   # pipeline.models.bundle.LDMBundle, frozen
    classifier: LatentClassifier
    optimizer: torch.optim.Optimizer
    loader: LatentLoader
    device: torch.device
    step: int = 0


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no CUDA device: set device=auto or cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def _as_json(cfg: TrainClassifierConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def _previous_save(cfg: TrainClassifierConfig) -> dict | None:
    """out_dir's classifier record, None for a new or empty out_dir; refuses a folder of other files
    (each save replaces out_dir as a whole)."""
    out_dir = Path(cfg.out_dir)
    record = checkpoint.read_record(out_dir)
    if record is None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir={cfg.out_dir!r} exists and holds no {checkpoint.CONFIG_FILE}: every save replaces "
                         "out_dir as a whole, so give a new or empty folder")
    return record


def _num_classes(cfg: TrainClassifierConfig, bundle) -> int:
    conditioner = bundle.preset.conditioner
    if cfg.num_classes is None and conditioner.kind != "class":
        raise ValueError(f"source={cfg.source!r} (preset {bundle.preset_name!r}) is not class-conditional: set "
                         "num_classes=<the number of classes in the labels>")
    return cfg.num_classes or conditioner.num_classes


def _loader(cfg: TrainClassifierConfig, bundle, num_classes: int) -> LatentLoader:
    """The labelled latents, scaled as the LDM sees them (App. G), of the LDM's latent shape."""
    if cfg.data.scale_factor not in (None, bundle.scale_factor):
        raise ValueError(f"data.scale_factor={cfg.data.scale_factor}, the model sees latents scaled by "
                         f"{bundle.scale_factor}: set data.scale_factor=null (the model's)")
    loader = LatentLoader(replace(cfg.data, scale_factor=bundle.scale_factor))
    loader.check_compatible(latent_channels=bundle.latent_shape[0], latent_size=tuple(bundle.latent_shape[1:]))
    if loader.classes is not None and len(loader.classes) > num_classes:
        raise ValueError(f"data.classes_file={cfg.data.classes_file!r} names {len(loader.classes)} classes, the "
                         f"classifier has {num_classes}: set num_classes={len(loader.classes)} or more")
    return loader


def _check_same_run(saved: dict, cfg: TrainClassifierConfig) -> None:
    old, new = _flat(saved), _flat(_as_json(cfg))
    changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"out_dir={cfg.out_dir!r} was trained with other settings ({', '.join(changed)}): resume "
                         "with the same ones, or set resume=never to start again (its save will be replaced)")


def setup(cfg: TrainClassifierConfig) -> Job:
    """Everything the steps need, every check made before the first one."""
    from pipeline.models.bundle import load_ldm

    if int(launcher_env().get("WORLD_SIZE", 1)) > 1:
        raise ValueError("jobs.train_classifier runs as one process: start it with python -m, not torchrun / srun")
    device = _device(cfg.device)
    previous = _previous_save(cfg)
    bundle = load_ldm(cfg.source, weights=cfg.weights)
    num_classes = _num_classes(cfg, bundle)
    loader = _loader(cfg, bundle, num_classes)
    latent_channels, latent_hw = bundle.latent_shape[0], tuple(bundle.latent_shape[1:])
    torch.manual_seed(cfg.seed)
    classifier = LatentClassifier(encoder_config(bundle.preset.unet, latent_channels), num_classes, latent_hw,
                                  cfg.pool).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    job = Job(cfg, bundle, classifier, optimizer, loader, device)
    if previous is not None and cfg.resume == "auto":
        state = checkpoint.resume(cfg.out_dir, classifier, optimizer)
        _check_same_run(state["config"], cfg)
        loader.load_state_dict(state["data"])
        job.step = int(state["step"])
        print0(f"resumed from {cfg.out_dir} at step {job.step}")
    return job


def _check_labels(labels_B: torch.Tensor, num_classes: int) -> None:
    if labels_B.numel() and int(labels_B.max()) >= num_classes:
        raise ValueError(f"class label {int(labels_B.max())} in the data, the classifier has {num_classes} classes "
                         f"(0..{num_classes - 1}): set num_classes or fix the labels")


def train_step(job: Job, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW step of cross-entropy on logits(q_sample(z_0, t, eps), t), t ~ U{0..T-1} per sample;
    returns (loss, accuracy) of the batch."""
    cfg, device, schedule = job.cfg, job.device, job.bundle.schedule
    z_0, y_B = batch["z"].to(device), batch["label"].to(device)
    _check_labels(y_B, job.classifier.num_classes)
    generator = micro_batch_generator(cfg.seed, 0, job.loader.batches_consumed - 1, device)
    t_B = torch.randint(0, schedule.num_timesteps, (len(z_0),), generator=generator, device=device)
    eps = torch.randn(z_0.shape, generator=generator, device=device)
    z_t = schedule.q_sample(z_0, t_B, eps)
    with autocast(cfg.precision, device):
        logits_BK = job.classifier(z_t, t_B)
    loss = F.cross_entropy(logits_BK.float(), y_B)
    job.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    job.optimizer.step()
    return loss.detach(), (logits_BK.argmax(dim=-1) == y_B).float().mean()


def save(job: Job) -> None:
    labels = {"label_key": job.cfg.data.label_key, "classes_file": job.cfg.data.classes_file,
              "classes": job.loader.classes}
    record = checkpoint.classifier_record(job.classifier, job.bundle, labels, job.step)
    state = {"step": job.step, "data": job.loader.state_dict(), "config": _as_json(job.cfg)}
    checkpoint.save(job.cfg.out_dir, job.classifier, record, job.optimizer, state)


def run(job: Job) -> dict:
    """Steps until max_steps, a JSON line per log interval, a save every checkpoint_every steps and at the end."""
    cfg, window, last = job.cfg, [], {"loss": math.nan, "accuracy": math.nan}
    batches, start = iter(job.loader), time.perf_counter()
    try:
        while job.step < cfg.max_steps:
            window.append(train_step(job, next(batches)))
            job.step += 1
            if job.step % cfg.log_every == 0 or job.step == cfg.max_steps:
                seconds = time.perf_counter() - start
                loss, accuracy = (float(torch.stack(v).mean()) for v in zip(*window))
                last = {"loss": loss, "accuracy": accuracy}
                print0(json.dumps({"step": job.step, **last, "samples_per_s": round(
                    len(window) * cfg.data.batch_size / max(seconds, 1e-9), 2)}))
                window, start = [], time.perf_counter()
            if job.step % cfg.checkpoint_every == 0 or job.step == cfg.max_steps:
                save(job)
    finally:
        batches.close()  # stops the loader's workers
    return {"out_dir": str(cfg.out_dir), "step": job.step, **last}


def train_classifier(cfg: TrainClassifierConfig) -> dict:
    """The job on a validated config: set up (every check first), train, save; returns the summary."""
    return run(setup(cfg))


main = hydra_main("train_classifier", TrainClassifierConfig, train_classifier)
