"""Process-group setup and the few collective helpers every training job uses, in one place.

    dist_info = init_distributed()          # torchrun, srun, or a plain `python -m ...`
    print0(f"world size {dist_info.world_size}")
    ...
    cleanup()

Launchers, in the order they are recognised:
- torchrun (or anything that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
- srun with one task per GPU: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID become RANK /
  WORLD_SIZE / LOCAL_RANK, MASTER_ADDR defaults to the first node of SLURM_JOB_NODELIST and
  MASTER_PORT to a port derived from SLURM_JOB_ID (the same on every task of the job);
- nothing: one process, and no process group unless asked for one (DeepSpeed needs one even
  alone; it then gets a one-rank group on 127.0.0.1 and a free port).

NCCL on CUDA, gloo on CPU. Every helper below also works without a process group.
"""
import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

SLURM_PORT_BASE, SLURM_PORT_RANGE = 20000, 20000  # MASTER_PORT = base + job id % range


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: no process group (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-007,011],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}: set MASTER_ADDR yourself")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """RANK & co. for a process started by srun (one task per GPU), without torchrun."""
    mapped = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
              "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        if "SLURM_JOB_NODELIST" not in env:
            raise ValueError("srun set SLURM_NTASKS > 1 but no SLURM_JOB_NODELIST: export MASTER_ADDR")
        mapped["MASTER_ADDR"] = first_slurm_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:
        mapped["MASTER_PORT"] = str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_RANGE)
    return mapped


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The torchrun-style variables this process was launched with ({} for a plain process)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                if k in env}
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return _env_from_slurm(env)
    return {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_env() -> dict[str, str]:
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


_ADDED_ENV: set[str] = set()  # what init_distributed put in os.environ; cleanup takes it out again


def init_distributed(always_init_process_group: bool = False, device: str = "auto") -> DistInfo:
    """Join the process group the launcher describes; see the module doc.

    device: "auto" (cuda:LOCAL_RANK when CUDA exists, else cpu), "cpu" or "cuda".
    always_init_process_group: give a plain single process a one-rank group too.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: use 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device: set device=auto or cpu")
    env = launcher_env()
    if not env and always_init_process_group:
        env = _single_process_env()
    for name, value in env.items():  # init_process_group's env:// reads them (srun mapping included)
        if name not in os.environ:
            _ADDED_ENV.add(name)
        os.environ[name] = value
    rank, world_size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    backend = None
    if env and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    elif dist.is_initialized():
        backend = dist.get_backend()
    return DistInfo(rank, world_size, local_rank, torch_device, backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def print0(*values, **kwargs) -> None:
    """print on rank 0 only (flushed, so that logs of several ranks interleave sensibly)."""
    if get_rank() == 0:
        print(*values, flush=True, **kwargs)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """src's obj on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a new tensor; the input is left as it is)."""
    if not is_distributed():
        return tensor.clone()
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on at least one (e.g. a preemption signal)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def average_gradients(parameters) -> None:
    """All-reduce-mean the .grad of parameters outside DDP (one flat buffer, one collective)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


TEARDOWN_BARRIER_TIMEOUT_S = 120


def cleanup(failed: bool | None = None) -> None:
    """End the process group. When DeepSpeed used it, through deepspeed.comm, which also drops the
    groups DeepSpeed cached (a later engine in this process would otherwise find stale ones).

    On the success path every rank first meets the others in a barrier: a rank that destroyed its
    gloo pairs while a peer was still inside the last collective aborted the peer ("terminate
    called without an active exception"). After a failure there is no barrier (the other ranks may
    never arrive). failed=None: decided by the exception in flight, so `finally: cleanup()` is
    right on both paths.
    """
    if failed is None:
        failed = sys.exc_info()[1] is not None
    if not failed and is_distributed():
        if dist.get_backend() == "gloo":  # bounded: a rank that died without raising here cannot hang us
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=TEARDOWN_BARRIER_TIMEOUT_S))
        else:
            dist.barrier()
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    elif dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name in _ADDED_ENV:
        os.environ.pop(name, None)
    _ADDED_ENV.clear()
