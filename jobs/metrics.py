"""The one metrics object of a training job: metrics.jsonl, W&B, image grids, progress bar.

    metrics = Metrics(cfg.logger, run_dir, config=asdict(cfg), is_main=dist_info.is_main,
                      total_steps=cfg.trainer.max_steps, start_step=resumed_step)
    metrics.log(step, {"loss": 0.12, "lr": 1e-4})
    metrics.log_images(step, "reconstructions", images_BCHW, num_columns=8)
    metrics.advance(step)
    metrics.close()

Every method may be called on every rank; only rank 0 writes (models never log: the loop
reports scalars here). W&B runs offline by default, which needs no account or network
(`wandb sync run_dir/wandb/offline-run-*` uploads later); "disabled" skips it entirely.
A resumed run truncates metrics.jsonl to the resumed step and continues the same W&B run.
"""
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WANDB_MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


@dataclass
class LoggerConfig:
    mode: str = "offline"       # W&B mode: offline | online | disabled
    project: str = "ldm-pipeline"
    entity: str | None = None
    group: str | None = None
    name: str | None = None     # default: the run folder's name
    log_every: int = 50         # steps between scalar logs
    image_every: int = 1000     # steps between image grids
    progress_bar: bool = True

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={self.mode!r}: use one of {WANDB_MODES}")
        if self.log_every <= 0 or self.image_every <= 0:
            raise ValueError("logger.log_every and logger.image_every must be positive step counts")


def image_grid(images_BCHW: torch.Tensor, num_columns: int) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] (float) or uint8 -> one uint8 HxWx3 grid, row-major, 2px gaps."""
    if images_BCHW.dtype != torch.uint8:
        images_BCHW = ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = images_BCHW.cpu().permute(0, 2, 3, 1).numpy()
    num, height, width, channels = images.shape
    num_rows = -(-num // num_columns)
    gap = 2
    grid = np.full((num_rows * (height + gap) - gap, num_columns * (width + gap) - gap, channels),
                   255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (i // num_columns) * (height + gap), (i % num_columns) * (width + gap)
        grid[top:top + height, left:left + width] = image
    return grid


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past `last_step`: they came from steps a resumed run will redo."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class Metrics:
    """Rank-0 sink for scalars and images; see the module doc."""

    def __init__(self, cfg: LoggerConfig, run_dir: str | Path, config: dict, is_main: bool,
                 total_steps: int, start_step: int = 0):
        self.cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main
        self._wandb_run, self._bar, self._jsonl = None, None, None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(self.run_dir / METRICS_FILE, start_step)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a")
        if cfg.mode != "disabled":
            self._wandb_run = self._init_wandb(config)
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _init_wandb(self, config: dict):
        import wandb

        os.environ.setdefault("WANDB_CACHE_DIR", str(self.run_dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(self.run_dir / "wandb" / "data"))
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        return wandb.init(mode=self.cfg.mode, dir=str(self.run_dir), project=self.cfg.project,
                          entity=self.cfg.entity, group=self.cfg.group,
                          name=self.cfg.name or self.run_dir.name, config=config, id=run_id,
                          resume="allow")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One record {"step": step, **scalars} to metrics.jsonl and W&B (rank 0)."""
        if not self.is_main:
            return
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)

    def log_images(self, step: int, name: str, images_BCHW: torch.Tensor,
                   num_columns: int) -> Path | None:
        """A grid PNG under run_dir/images/ (and to W&B); returns its path on rank 0."""
        if not self.is_main:
            return None
        path = self.run_dir / "images" / f"{name}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images_BCHW, num_columns)).save(path)
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({name: wandb.Image(str(path))}, step=step)
        return path

    def advance(self, step: int, postfix: dict[str, float] | None = None) -> None:
        """Move the progress bar to `step` (rank 0)."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        self._wandb_run, self._bar, self._jsonl = None, None, None
