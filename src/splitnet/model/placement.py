"""Where the columns run: resolve a device request into one torch.device per column.

Devices are passed in when the model is built, never written into the layout (design notes).
`devices=None` picks ("cuda:0", "cuda:1", ...) when there is a GPU per column, all columns on
cuda:0 when there is one GPU, else the CPU emulation, and logs which in one line.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger("splitnet")


class DeviceError(RuntimeError):
    """A requested device does not exist or cannot be used."""


def synchronize(devices) -> None:
    """Wait until the queued work of every CUDA device among `devices` is done (CPU work is
    synchronous): before and after a timed region."""
    for d in set(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def cudnn_autotune(devices) -> bool:
    """Let cuDNN time its convolution algorithms once per shape (torch.backends.cudnn.benchmark) when
    any of `devices` is a GPU: a training run repeats the same shapes for hours, and the default
    heuristic choice can be several times slower. Returns whether it is on (recorded in run.json).
    It makes GPU runs not bitwise repeatable (the algorithm may change between runs); the CPU is
    unaffected."""
    if any(torch.device(d).type == "cuda" for d in devices):
        torch.backends.cudnn.benchmark = True
    return bool(torch.backends.cudnn.benchmark)


def check_device(dev: torch.device, column: int) -> torch.device:
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= n:
            raise DeviceError(f"column {column}: device {dev} requested, but this machine has "
                              f"{n} CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type == "cpu":
        return torch.device("cpu")
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # noqa: BLE001 - any backend error means the device is unusable
        raise DeviceError(f"column {column}: device {dev} is not usable here: {e}") from None
    return dev


def resolve_devices(devices, columns: int) -> tuple:
    """One torch.device per column from None, a single device (all columns) or one per column."""
    if devices is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n >= columns and columns > 1:
            out = tuple(torch.device("cuda", c) for c in range(columns))
            log.info("splitnet: %d columns on %s", columns, ", ".join(map(str, out)))
        elif n >= 1:
            out = (torch.device("cuda", 0),) * columns
            log.info("splitnet: %d GPU(s) for %d columns: all columns on cuda:0", n, columns)
        else:
            out = (torch.device("cpu"),) * columns
            log.warning("splitnet: no GPU found, running the %d columns in the CPU emulation", columns)
        return out
    if isinstance(devices, (str, torch.device)):
        devices = (devices,) * columns
    devices = tuple(devices)
    if len(devices) != columns:
        raise DeviceError(f"the layout has {columns} column(s) but {len(devices)} device(s) were given: "
                          f"{', '.join(map(str, devices))}")
    out = []
    for c, d in enumerate(devices):
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise DeviceError(f"column {c}: {d!r} is not a device name ({e})") from None
        out.append(check_device(dev, c))
    return tuple(out)


def describe(devices: Sequence[torch.device]) -> str:
    """'cpu emulation', 'cuda:0 (both columns)', 'cuda:0 + cuda:1' ..."""
    names = [str(d) for d in devices]
    if len(set(names)) == 1:
        where = names[0]
        return f"{where} emulation" if where == "cpu" and len(names) > 1 else (
            f"{where} (all {len(names)} columns)" if len(names) > 1 else where)
    return " + ".join(names)
