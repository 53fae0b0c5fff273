"""The clock and the yardstick of the benchmarks: a synchronised timer, one training step, and the
matmul peak that model FLOP utilisation is measured against."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..model.placement import synchronize


def matmul_peak_gflops(device: torch.device, n: int = 2048, seconds: float = 1.0,
                       dtype=torch.float32) -> float:
    """Best sustained n x n matmul rate: the yardstick for model FLOP utilisation."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize([device])
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize([device])
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def train_step(net, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def timed(fn, devices) -> float:
    synchronize(devices)
    t0 = time.perf_counter()
    fn()
    synchronize(devices)
    return time.perf_counter() - t0
