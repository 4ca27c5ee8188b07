"""Held-out evaluation of a first stage: Tab. 8's PSNR, SSIM, LPIPS (PSIM) and R-FID columns.

Every rank reconstructs its share of the held-out images; sums are all-reduced and every
rank returns the same numbers. KL models reconstruct from the posterior mean (a
deterministic metric); VQ models from their quantised codes, whose usage (perplexity,
share of the codebook used) is reported too. The latent scale of App. G, 1 / std(z) of
posterior samples (KL) or pre-quantisation latents (VQ), is measured on the same images
and exported with the model.

R-FID uses torch-fidelity's InceptionV3; its weights are downloaded by torch-fidelity
unless `inception_weights_path` names a local copy, and it is skipped with a reason when
neither works (no network on the training machines, by default).
"""
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch.utils.data import Dataset

from jobs.distributed import (
    all_gather_object,
    broadcast_object,
    get_rank,
    is_distributed,
)
from ldm.autoencoder.lpips import LPIPS
from ldm.autoencoder.model import DiagonalGaussian
from ldm.image_metrics import psnr, ssim

SUM_KEYS = ("psnr", "ssim", "lpips", "num_images", "z_sum", "z_sq_sum", "z_count")


def to_model_input(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1] on `device` (the autoencoder's range)."""
    return images_uint8.to(device, non_blocking=True).float() / 127.5 - 1.0


def to_uint8(x_BCHW: torch.Tensor) -> torch.Tensor:
    return ((x_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def reconstruct(model: torch.nn.Module, x_BCHW: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_rec, z for the scale estimate, VQ code indices or None), without gradients.

    KL noise comes from `generator`, never the global RNG: evaluating must not change the
    training run (a resumed run has to match an uninterrupted one bitwise).
    """
    moments = model.encode_moments(x_BCHW)
    if model.cfg.kind == "kl":
        posterior = DiagonalGaussian(moments.float())
        return model.decode(posterior.mode().to(moments.dtype)), posterior.sample(generator), None
    _, _, indices_BHW = model.quantize(moments)
    return model.decode_indices(indices_BHW), moments, indices_BHW


class _ImageTensors(Dataset):
    """uint8 [N, 3, H, W] as the dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def rfid(real_uint8: torch.Tensor, fake_uint8: torch.Tensor, weights_path: str | None,
         device: torch.device) -> float:
    """FID (Heusel et al. 2017) between inputs and reconstructions, torch-fidelity's Inception."""
    import torch_fidelity

    result = torch_fidelity.calculate_metrics(
        input1=_ImageTensors(fake_uint8), input2=_ImageTensors(real_uint8), fid=True,
        cuda=device.type == "cuda", verbose=False, feature_extractor_weights_path=weights_path,
        batch_size=min(64, len(real_uint8)), save_cpu_ram=True)  # in-memory inputs: no loader workers
    return float(result["frechet_inception_distance"])


def rfid_or_reason(real_uint8: torch.Tensor, fake_uint8: torch.Tensor, weights_path: str | None,
                   device: torch.device) -> float | str:
    """The R-FID, or why it was skipped (missing weights, too few images)."""
    if weights_path is not None and not Path(weights_path).is_file():
        return f"skipped: eval.inception_weights_path={weights_path!r} is not a file"
    if len(real_uint8) < 2:
        return "skipped: FID needs at least 2 held-out images"
    try:
        return rfid(real_uint8, fake_uint8, weights_path, device)
    except (OSError, RuntimeError) as err:  # no network for the weights download, typically
        return (f"skipped: torch-fidelity could not run ({type(err).__name__}: {err}); set "
                "eval.inception_weights_path to a local pt_inception-2015-12-05 weights file")


class EvalAccumulator:
    """Running sums of one rank; `result()` reduces over ranks."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.sums = dict.fromkeys(SUM_KEYS, 0.0)
        vq = model.cfg.kind == "vq"
        self.code_counts = torch.zeros(model.cfg.num_embeddings if vq else 0, dtype=torch.float64)
        self.device = device
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []

    def add(self, x_BCHW, x_rec_BCHW, z, indices_BHW, lpips_B: torch.Tensor | None, keep_images: bool):
        self.sums["psnr"] += psnr(x_BCHW, x_rec_BCHW).sum().item()
        self.sums["ssim"] += ssim(x_BCHW, x_rec_BCHW).sum().item()
        self.sums["lpips"] += 0.0 if lpips_B is None else lpips_B.float().sum().item()
        self.sums["num_images"] += x_BCHW.shape[0]
        z = z.float()
        self.sums["z_sum"] += z.sum().item()
        self.sums["z_sq_sum"] += z.square().sum().item()
        self.sums["z_count"] += z.numel()
        if indices_BHW is not None:
            self.code_counts += torch.bincount(indices_BHW.flatten().cpu(),
                                               minlength=len(self.code_counts)).double()
        if keep_images:
            self.real.append(to_uint8(x_BCHW))
            self.fake.append(to_uint8(x_rec_BCHW))

    def reduced(self) -> tuple[dict[str, float], torch.Tensor]:
        packed = torch.tensor([self.sums[k] for k in SUM_KEYS], dtype=torch.float64)
        packed = torch.cat([packed, self.code_counts])
        if is_distributed():
            import torch.distributed as dist

            packed = packed.to(self.device)
            dist.all_reduce(packed)
            packed = packed.cpu()
        return dict(zip(SUM_KEYS, packed[:len(SUM_KEYS)].tolist())), packed[len(SUM_KEYS):]


def summarize(sums: dict[str, float], code_counts: torch.Tensor, with_lpips: bool) -> dict:
    n = sums["num_images"]
    if n == 0:
        raise ValueError("the held-out shards gave no decodable images: check data.eval_path / "
                         "data.num_eval_shards and eval.num_images")
    mean_z = sums["z_sum"] / sums["z_count"]
    std_z = max(sums["z_sq_sum"] / sums["z_count"] - mean_z ** 2, 0.0) ** 0.5
    result = {"psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n, "num_images": int(n),
              "latent_std": std_z, "scale_factor": 1.0 / std_z if std_z > 0 else None}
    if with_lpips:
        result["lpips"] = sums["lpips"] / n
    if len(code_counts):
        p = code_counts / code_counts.sum()
        result["codebook_perplexity"] = float(torch.exp(-torch.special.xlogy(p, p).sum()))
        result["codebook_fraction_used"] = float((code_counts > 0).double().mean())
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
             autocast: Callable[[], AbstractContextManager], lpips: LPIPS | None = None, rfid_enabled: bool = False,
             inception_weights_path: str | None = None, num_grid_images: int = 8
             ) -> tuple[dict, torch.Tensor]:
    """(metrics, grid [2n, 3, H, W]: n inputs then their reconstructions, rank 0's first).

    `model` is the plain autoencoder (not DDP-wrapped) in eval mode; `autocast` is the
    training precision's context factory (e.g. `lambda: torch.autocast("cuda", torch.bfloat16)`).
    """
    acc, grid = EvalAccumulator(model, device), []
    generator = torch.Generator(device).manual_seed(0)
    for batch in batches:
        x_BCHW = to_model_input(batch, device)
        with autocast():
            x_rec_BCHW, z, indices_BHW = reconstruct(model, x_BCHW, generator)
            lpips_B = lpips(x_BCHW, x_rec_BCHW.float()) if lpips is not None else None
        x_rec_BCHW = x_rec_BCHW.float()
        acc.add(x_BCHW, x_rec_BCHW, z, indices_BHW, lpips_B, keep_images=rfid_enabled)
        if sum(len(g) for g in grid) < 2 * num_grid_images:
            grid.append(torch.cat([to_uint8(x_BCHW), to_uint8(x_rec_BCHW)]))
    sums, code_counts = acc.reduced()
    result = summarize(sums, code_counts, with_lpips=lpips is not None)
    if rfid_enabled:
        result["rfid"] = _gathered_rfid(acc, inception_weights_path, device)
    return result, _grid(grid, num_grid_images)


def _gathered_rfid(acc: EvalAccumulator, weights_path: str | None, device: torch.device) -> float | str:
    """Every rank's images to rank 0 (small: eval.num_images), which computes it for all."""
    real = [t for part in all_gather_object(acc.real) for t in part]
    fake = [t for part in all_gather_object(acc.fake) for t in part]
    value = rfid_or_reason(torch.cat(real), torch.cat(fake), weights_path, device) if get_rank() == 0 else None
    return broadcast_object(value)


def _grid(pairs: list[torch.Tensor], num_images: int) -> torch.Tensor:
    """Batches of [inputs; reconstructions] -> [first n inputs; their n reconstructions]."""
    if not pairs:  # this rank had no held-out images
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    inputs = torch.cat([p[:len(p) // 2] for p in pairs])[:num_images]
    outputs = torch.cat([p[len(p) // 2:] for p in pairs])[:num_images]
    return torch.cat([inputs, outputs])
