"""EMA of the trainable weights under every ZeRO stage (ldm.diffusion.ema.EMA's rule, shadows in fp32).

ZeRO-0/1/2 keep a full fp32 replica of every parameter on every rank, so the EMA averages the
live parameters and is the same on all ranks. ZeRO-3 keeps only a 1/world_size slice of each
parameter (`param.ds_tensor`, the flat padded partition rank r owns), so here the EMA averages
that local slice: the update is elementwise, hence exactly the slice of the full EMA, with no
communication per step. `full_state_dict()` gathers the slices (a collective: every rank calls
it) when a checkpoint or a sample grid needs the whole averaged model.
"""
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ldm.diffusion.ema import EMA, NUM_UPDATES_KEY


def _is_zero3_partitioned(p: Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None


def local_views(module: nn.Module) -> dict[str, nn.Parameter]:
    """{name: this rank's fp32 tensor of the parameter} (the whole one, or its ZeRO-3 slice), as
    Parameters sharing storage, to initialise ldm.diffusion.ema.EMA's shadows."""
    views = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        tensor = p.ds_tensor if _is_zero3_partitioned(p) else p
        views[name] = nn.Parameter(tensor.data, requires_grad=True)
    return views


class TrainEMA:
    """`ldm.diffusion.ema.EMA` over `local_views(module)`; see the module doc."""

    def __init__(self, module: nn.Module, decay: float):
        self.module = module
        self.ema = EMA(local_views(module).items(), decay=decay)
        self.partitioned = any(_is_zero3_partitioned(p) for p in module.parameters())

    @torch.no_grad()
    def update(self) -> None:
        """ldm.diffusion.ema.EMA.update's rule in one fused lerp over all shadows (a per-tensor loop costs
        milliseconds per step on a small model); the live tensors are looked up afresh each time."""
        ema = self.ema
        ema.num_updates += 1
        live = {name: p.ds_tensor if _is_zero3_partitioned(p) else p
                for name, p in self.module.named_parameters() if name in ema.shadow}
        names = list(ema.shadow)
        torch._foreach_lerp_([ema.shadow[n] for n in names], [live[n].detach().float() for n in names],
                             1.0 - ema.decay_at(ema.num_updates))

    def local_state_dict(self) -> dict[str, Tensor]:
        return self.ema.state_dict()

    def load_local_state_dict(self, state: dict[str, Tensor]) -> None:
        self.ema.load_state_dict(state)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """{name: full fp32 EMA weight} on every rank (all-gathers the ZeRO-3 slices)."""
        state = self.ema.state_dict()
        if not self.partitioned:
            return {name: tensor.clone() for name, tensor in state.items()}
        params = dict(self.module.named_parameters())
        full = {name: _gather_slices(shadow, params[name]) for name, shadow in self.ema.shadow.items()}
        return {**full, NUM_UPDATES_KEY: state[NUM_UPDATES_KEY]}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from full weights (e.g. ema.safetensors): each rank keeps its own slice."""
        if not self.partitioned:
            self.ema.load_state_dict(state)
            return
        params = dict(self.module.named_parameters())
        local = {name: _my_slice(state[name], params[name]) for name in self.ema.shadow}
        self.ema.load_state_dict({**local, NUM_UPDATES_KEY: state[NUM_UPDATES_KEY]})


def _gather_slices(shadow: Tensor, param: Tensor) -> Tensor:
    """ZeRO-3 partitioning: the flat parameter, padded to world_size equal slices, rank r owning the r-th."""
    slices = [torch.empty_like(shadow) for _ in range(dist.get_world_size())]
    dist.all_gather(slices, shadow.contiguous())
    return torch.cat(slices)[: param.ds_numel].view(param.ds_shape)


def _my_slice(full: Tensor, param: Tensor) -> Tensor:
    size = param.ds_tensor.numel()
    flat = torch.zeros(size * dist.get_world_size(), dtype=torch.float32)
    flat[: full.numel()] = full.reshape(-1).float()
    rank = dist.get_rank()
    return flat[rank * size: (rank + 1) * size].clone()
