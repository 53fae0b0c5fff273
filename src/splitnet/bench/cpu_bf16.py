"""Whether bf16 pays on this CPU: a training step under bf16 autocast against float32, interleaved.

CPUs with AVX-512 BF16 or AMX have bf16 matrix units that oneDNN uses under autocast; AVX2 machines
do not, and there bf16 only adds conversions. The answer is the CPU's, so the bench measures it
where it runs and names the instruction sets it found (/proc/cpuinfo's flags).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model.columns import SplitAlexNet
from ..model.config import ModelConfig
from .timing import paper_optimizer, spread, timed, train_step

BF16_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags(cpuinfo: str | None = None) -> list:
    """The instruction sets among BF16_FLAGS that /proc/cpuinfo (or the text `cpuinfo`) lists."""
    if cpuinfo is None:
        info = Path("/proc/cpuinfo")
        cpuinfo = info.read_text() if info.is_file() else ""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in BF16_FLAGS if f in have]


def _pair(geometry: str, batch: int, reps: int, modes: tuple) -> dict:
    """Seconds per training step in each of two modes, interleaved over `reps` rounds after one warm-up."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=10 if geometry == "cifar" else 1000, geometry=geometry)
    net = SplitAlexNet(config=cfg, devices="cpu").train()
    opt = paper_optimizer(net)
    x = torch.randn(batch, 3, net.input_side, net.input_side) * 60
    y = torch.randint(0, cfg.num_classes, (batch,))
    times = {m: [] for m in modes}
    for r in range(reps + 1):
        for m in modes:
            s = timed(lambda: train_step(net, opt, x, y, step=r, mode=m), net.devices)
            if r:  # round 0 warms up both modes (oneDNN's kernels are built at first use)
                times[m].append(s)
    ratios = [b / a for a, b in zip(times[modes[0]], times[modes[1]])]
    return {"modes": list(modes), "batch": batch, "step_s": {m: spread(v) for m, v in times.items()},
            "ratio": spread(ratios), "all_times_s": times}


# The modes compared per geometry: the full network as the paper's run would be set, the CIFAR-scale
# one in channels_last, as experiments/cifar.toml trains it.
MODES = {"imagenet": ("fp32", "bf16"), "cifar": ("fp32_cl", "bf16_cl")}


def bf16_vs_fp32(batch: int = 8, reps: int = 3, cifar_batch: int = 128, geometries=("imagenet", "cifar")) -> dict:
    """bf16/fp32 step-time ratios (median over interleaved rounds, with their range) of the full network
    (batch `batch`) and of the CIFAR-scale one (`cifar_batch`), with the CPU's flags. A ratio below 1
    means bf16 is faster. The full network's batch is small: on an AVX2 CPU its bf16 step is slow."""
    out = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads()}
    for g in geometries:
        out[g] = _pair(g, cifar_batch if g == "cifar" else batch, reps, MODES[g])
    return out
