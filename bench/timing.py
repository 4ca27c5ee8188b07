"""Timing shared by the benchmarks: ours and the peer timed in the same process, alternating.

`img_per_s` warms both steps up (and compiles them), then runs `rounds` rounds of `num_steps`
steps each, ours and the peer in turn, so that drift of a shared machine hits both alike, and
reports the median round.
"""
import statistics
import time
from collections.abc import Callable

import torch


def time_steps(step: Callable[[], object], num_steps: int, device: torch.device) -> float:
    """Seconds per call of `step`, CUDA work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    sync()
    return (time.perf_counter() - start) / num_steps


def img_per_s(steps: dict[str, Callable[[], object]], batch_size: int, num_steps: int, rounds: int,
              device: torch.device, num_warmup: int = 2) -> dict[str, float]:
    """Images per second of each named step (median over alternating rounds)."""
    for step in steps.values():
        for _ in range(num_warmup):
            step()
    seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(time_steps(step, num_steps, device))
    return {name: batch_size / statistics.median(s) for name, s in seconds.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n^3 matmul: the peak MFU is measured against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / time_steps(lambda: a @ b, 10, device)
