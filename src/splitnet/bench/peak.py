"""The two denominators of training FLOP utilisation: the matmul rate measured on the devices, in
samples taken between the timed training steps (`MatmulPeak`), and the devices' nominal peak (CPU:
cores x FLOP/cycle of the vector ISA x clock, `cpu_nominal_peak`; GPU: the datasheet's dense figure
for the precision, `gpu_nominal_peak`). Rates are FLOP/s, a multiply-add = 2 FLOPs."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from ..model.placement import synchronize


class MatmulPeak:
    """Samples of the dense matmul rate of `devices` (distinct devices run their products at the
    same time, so two GPUs give the sum of both). Take one `sample()` between two timed training
    steps: the peak is then measured under the same clocks, heat and contention as the steps.

    n: the side of the square operands (CPU 2048: 17 GFLOP a product, about 0.1 s on 2 cores;
    GPU 8192: 1.1 TFLOP, about a millisecond in bf16 on an H100, hence `k` products a sample)."""

    def __init__(self, devices, dtype=torch.float32, n: int | None = None, k: int | None = None):
        self.devices = sorted({torch.device(d) for d in devices}, key=str)
        gpu = any(d.type == "cuda" for d in self.devices)
        self.n = n or (8192 if gpu else 2048)
        self.k = k or (10 if gpu else 1)
        self.dtype = dtype
        self.operands = [(torch.randn(self.n, self.n, device=d, dtype=dtype),
                          torch.randn(self.n, self.n, device=d, dtype=dtype)) for d in self.devices]
        self.samples: list = []

    def sample(self) -> float:
        """FLOP/s of k products of n x n on every device, issued round-robin, synchronised."""
        synchronize(self.devices)
        t0 = time.perf_counter()
        for _ in range(self.k):
            for a, b in self.operands:
                a @ b
        synchronize(self.devices)
        rate = self.k * len(self.operands) * 2 * self.n ** 3 / (time.perf_counter() - t0)
        self.samples.append(rate)
        return rate

    @property
    def peak(self) -> float:
        """The best sample: the most the devices delivered while the steps ran."""
        return max(self.samples)


# ---- CPU: cores x FLOP/cycle x clock --------------------------------------------------------
# fp32 FLOPs per cycle per core, assuming 2 FMA units per core (Intel since Haswell, AMD since Zen 2):
# one FMA = 2 FLOPs on each of 16 (AVX-512) or 8 (AVX2) lanes, x 2 units; SSE: 4 lanes x (add + mul).
_ISA = (("avx512f", ("avx512f",), 64), ("avx2+fma", ("avx2", "fma"), 32), ("sse", (), 8))


def flop_per_cycle(flags) -> tuple:
    """(ISA name, fp32 FLOPs per cycle per core) from /proc/cpuinfo's flags."""
    flags = set(flags)
    return next((name, f) for name, need, f in _ISA if flags.issuperset(need))


def cpu_nominal_peak(cpuinfo: str, allowed=None, max_freq_khz: int | None = None) -> dict:
    """The nominal fp32 peak of the CPUs in `allowed` (processor numbers; default all) from the text
    of /proc/cpuinfo: physical cores (distinct (physical id, core id): hyper-threads share the FMA
    units) x FLOP/cycle of the ISA (`flop_per_cycle`, 2 FMA units assumed) x clock, the clock from
    cpufreq's cpuinfo_max_freq when given (`max_freq_khz`), else cpuinfo's "cpu MHz" (the clock at the
    time of reading). {"flops", "cores", "flop_per_cycle", "isa", "hz", "clock_source", "basis"}."""
    procs = [dict(re.findall(r"^([^\t:\n]+?)\s*:\s*(.*)$", block, re.M))
             for block in cpuinfo.strip().split("\n\n") if block.strip()]
    procs = [p for p in procs if "processor" in p and (allowed is None or int(p["processor"]) in allowed)]
    if not procs:
        raise ValueError("cpuinfo: no processor entries (among the allowed CPUs)")
    cores = len({(p.get("physical id"), p.get("core id", p["processor"])) for p in procs})
    isa, fpc = flop_per_cycle(procs[0].get("flags", "").split())
    if max_freq_khz:
        hz, source = max_freq_khz * 1e3, "cpufreq cpuinfo_max_freq"
    else:
        hz, source = float(procs[0]["cpu MHz"]) * 1e6, "/proc/cpuinfo cpu MHz"
    return {"flops": cores * fpc * hz, "cores": cores, "flop_per_cycle": fpc, "isa": isa, "hz": hz,
            "clock_source": source,
            "basis": f"{cores} cores x {fpc} fp32 FLOP/cycle ({isa}, 2 FMA units a core assumed) x "
                     f"{hz / 1e9:.3f} GHz ({source})"}


def read_cpu_nominal_peak() -> dict | None:
    """cpu_nominal_peak of the CPUs this process may run on, from /proc/cpuinfo and cpufreq (Linux;
    None elsewhere)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return None
    freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    khz = int(freq.read_text().split()[0]) if freq.is_file() else None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        return cpu_nominal_peak(info.read_text(), allowed, khz)
    except (ValueError, KeyError) as e:
        return {"flops": None, "basis": f"unknown ({e})"}


# ---- GPU: the datasheet ---------------------------------------------------------------------
# Dense (no structured sparsity) TFLOP/s per GPU by name fragment, first match wins:
# (fp32 without tensor cores, tf32 tensor cores, bf16 tensor cores; fp16 tensor cores have the bf16
# figure on these cards). NVIDIA datasheets halve the sparse figures they headline (H100 SXM: tf32
# 989 -> 494.7, bf16 1979 -> 989.4).
GPU_DATASHEET = (
    (("H200",), (67.0, 494.7, 989.4)),
    (("H100", "PCIe"), (51.0, 378.0, 756.5)),
    (("H100", "NVL"), (60.0, 417.5, 835.5)),
    (("H100",), (67.0, 494.7, 989.4)),  # SXM5
    (("A100",), (19.5, 156.0, 312.0)),
)
_COLUMN = {"fp32": 0, "fp32_cl": 0, "tf32": 1, "bf16": 2, "bf16_cl": 2, "fp16": 2, "fp16_cl": 2}


def gpu_nominal_peak(names, mode: str) -> dict:
    """The summed datasheet peak (FLOP/s) of the GPUs `names` (torch.cuda.get_device_name) in the
    precision `mode` (precision.py: fp32 = no TF32, tf32, bf16 and bf16_cl = bf16 tensor cores).
    {"flops": None, "basis": why} when a card is not in GPU_DATASHEET."""
    total, parts = 0.0, []
    for name in names:
        row = next((tf for frag, tf in GPU_DATASHEET if all(f in name for f in frag)), None)
        if row is None:
            return {"flops": None, "basis": f"{name!r} is not in bench/peak.py GPU_DATASHEET: no nominal peak"}
        total += row[_COLUMN[mode]] * 1e12
        parts.append(f"{name} {row[_COLUMN[mode]]:g}")
    return {"flops": total, "basis": " + ".join(parts) + f" TFLOP/s ({mode}, dense, datasheet)"}


def nominal_peak(devices, mode: str) -> dict:
    """The nominal peak of the distinct devices a model runs on: the CPU's (cores x FLOP/cycle x
    clock) or the sum of the GPUs' datasheet figures."""
    devs = sorted({torch.device(d) for d in devices}, key=str)
    if all(d.type == "cpu" for d in devs):
        if mode != "fp32":
            return {"flops": None, "basis": f"no nominal CPU peak for {mode}"}
        return read_cpu_nominal_peak() or {"flops": None, "basis": "no /proc/cpuinfo"}
    return gpu_nominal_peak([torch.cuda.get_device_name(d) for d in devs if d.type == "cuda"], mode)
