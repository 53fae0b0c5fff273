"""The exchange: the only code that moves activations between columns (§3.2).

A crossing layer (conv3, fc6, fc7, fc8 in the paper) reads every column's maps. `LocalExchange`
does this inside one process: each foreign column's tensor is copied to the reading column's device
and concatenated in column order (column 0's channels first), and autograd carries the gradients
back across the copy. A torch.distributed implementation of the same interface lives in
train/distributed.py.

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
