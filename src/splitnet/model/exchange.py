"""The exchange: the only code that moves activations, and their gradients, between columns (§3.2).

A crossing layer (conv3, fc6, fc7, fc8 in the paper) reads every column's maps. `LocalExchange`
does this inside one process: each foreign column's tensor is copied to the reading column's device
and concatenated in column order (column 0's channels first). Autograd carries the gradients back
across the copy; where a strategy runs backward itself (the threads executor, concurrent.py),
`LocalExchange.gather_backward` is the same routing written out. A torch.distributed implementation
of `gather` lives in train/distributed.py.

Besides the exchange proper: `broadcast` hands the image to every column (§3.2: both columns read
it) and `broadcast_backward` sums their gradients; `collect` concatenates the columns' outputs on
one device for a readout (SplitAlexNet.features). Neither is a message between columns, so neither
is recorded.

`record_exchanges()` logs one event per tensor that leaves its column, so tests and benchmarks can
check the traffic against the layout's table.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass(frozen=True)
class ExchangeEvent:
    layer: str  # the crossing layer whose input this is
    src: int  # column the tensor leaves
    dst: int  # column that reads it
    nbytes: int  # bytes of the whole batch's tensor
    shape: tuple = ()


_lock = threading.Lock()
_active: list = []


@contextlib.contextmanager
def record_exchanges() -> Iterator[list]:
    """Collect ExchangeEvents of every forward pass run inside the block (nested blocks all see them)."""
    log: list = []
    with _lock:
        _active.append(log)
    try:
        yield log
    finally:
        with _lock:
            _active.remove(log)


def _record(event: ExchangeEvent) -> None:
    if _active:
        with _lock:
            for log in _active:
                log.append(event)


class LocalExchange:
    """Exchange between columns that live in one process (any mix of devices)."""

    def __init__(self, devices: Sequence[torch.device]):
        self.devices = tuple(devices)

    def gather(self, layer: str, outs: Sequence, readers: Sequence[int]) -> list:
        """Inputs of a crossing layer: for each reading column, every column's output concatenated.

        outs[c]: column c's output [B, C_c, H, W] (or [B, F_c]), None where c has none.
        Returns a list indexed by column: the concatenation [B, sum C_c, ...] on the reader's device,
        None for columns that do not compute the layer.
        """
        res = [None] * len(outs)
        for d in readers:
            parts = []
            for s, t in enumerate(outs):
                if t is None:
                    continue
                if s != d:
                    _record(ExchangeEvent(layer, s, d, t.numel() * t.element_size(), tuple(t.shape)))
                    # Non-blocking: a GPU-to-GPU copy is queued on the stream, the host does not wait,
                    # so the two columns keep running concurrently between exchanges.
                    t = t.to(self.devices[d], non_blocking=True)
                parts.append(t)
            res[d] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return res

    def gather_backward(self, outs: Sequence, grads: Sequence) -> list:
        """The adjoint of `gather`: gradients of the readers' concatenations back to the columns.

        outs[s]: column s's output that `gather` read (None where it had none); grads[d]: the
        gradient of reader d's concatenation (None where d does not read or needs none). Returns,
        per column s, the sum over readers of its channel slice, on its device (None if no reader
        sent one).
        """
        res = [None] * len(outs)
        slices, lo = {}, 0  # column s's channels in every concatenation: [lo, lo + width)
        for s, t in enumerate(outs):
            if t is not None:
                slices[s] = (lo, t.shape[1])
                lo += t.shape[1]
        for g in grads:
            if g is None:
                continue
            for s, (start, width) in slices.items():
                part = g[:, start:start + width].to(outs[s].device, non_blocking=True)
                res[s] = part if res[s] is None else res[s] + part
        return res


def broadcast(x: torch.Tensor, devices: Sequence, local: Sequence[int]) -> list:
    """The image for every column (§3.2: each reads all of it): a copy on each local column's device,
    None for columns held by other processes."""
    return [x.to(dev, non_blocking=True) if c in local else None for c, dev in enumerate(devices)]


def broadcast_backward(grads: Sequence, device) -> torch.Tensor | None:
    """The adjoint of `broadcast`: the image's gradient is the sum of the columns' (on `device`)."""
    total = None
    for g in grads:
        if g is not None:
            g = g.to(device)
            total = g if total is None else total + g
    return total


def collect(outs: Sequence, device) -> torch.Tensor:
    """Every column's output flattened and concatenated in column order on `device` (a readout,
    e.g. the fc7 features of §6.1: not recorded as an exchange)."""
    return torch.cat([t.to(device).flatten(1) for t in outs if t is not None], dim=1)
