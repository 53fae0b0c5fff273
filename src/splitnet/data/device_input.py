"""The device input path: batches leave the CPU as cached (uint8) and are finished on the model's
device (§4.1's crop, mirror, PCA lighting and mean subtraction), one batch ahead.

Why: a training step on a modern GPU consumes more images per second than a few CPU workers can crop
and convert to float. Moving the uint8 256x256 images instead of float32 224x224 crops also sends
1/3 of the bytes over PCIe (196,608 vs 602,112 per image). The workers only gather the images and
draw the random parameters (loader.py, raw=True); DeviceBatches then, for each batch:

  1. copies it and its random choices (pinned memory, non_blocking) to the device on the side CUDA
     stream (one per device for the whole run, not one per epoch),
  2. runs pipeline.train_batch there (one batched gather + two elementwise kernels, pipeline._gathered;
     the lighting shift computed on the device too: nothing waits on the host),
  3. hands it to the training step, which waits on an event for it, while the next batch is already
     queued on the side stream.

The result is bitwise the batch the CPU path builds (the same float32 operations on the same operands;
tests hold them equal), so a run gives the same numbers whichever path feeds it, and resumes exactly.
On a CPU device it does the same work in the main process (no stream), which the tests use.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from . import pipeline as P
from .config import DataConfig


class DeviceBatches:
    """Iterable of (float32 x [B, 3, c, c] on `device`, int64 y on `label_device`) from a loader made
    with make_loader(..., raw=True). len() and `dataset` as the loader's."""

    def __init__(self, loader, device, label_device=None, cfg: DataConfig | None = None, train: bool = True,
                 ten_patches: bool = False):
        self.loader, self.cfg, self.train, self.ten = loader, cfg or DataConfig(), train, ten_patches
        self.device = torch.device(device)
        self.label_device = torch.device(label_device) if label_device is not None else self.device
        ds = loader.dataset
        self.dataset = ds
        self.mean = ds.mean.to(self.device)
        # float32 on the device once, as lighting_shift would convert them at every batch (a blocking
        # copy of 12 numbers from pageable memory); the same rounding, so the same shift.
        self.eigvals, self.eigvecs = (torch.as_tensor(v, dtype=torch.float32, device=self.device)
                                      for v in (ds.eigvals, ds.eigvecs))

    def __len__(self) -> int:
        return len(self.loader)

    def _finish(self, raw, stream):
        """Queue batch `raw`'s copy and augmentation (on `stream` when on a GPU); returns the pending batch."""
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            images = raw[0].to(self.device, non_blocking=True)
            y = raw[1].to(self.label_device, non_blocking=True)
            if self.train:
                params = raw[2].to(self.device, non_blocking=True)
                x = P.train_batch(images, params, self.mean, self.eigvals, self.eigvecs, self.cfg)
            else:
                x = P.eval_batch(images, self.mean, self.cfg, ten=self.ten)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        return x, y, event

    def __iter__(self):
        stream = side_stream(self.device) if self.device.type == "cuda" else None
        it = iter(self.loader)
        pending = None
        for raw in it:
            nxt = self._finish(raw, stream)  # queued before the previous batch is handed out
            if pending is not None:
                yield self._ready(*pending)
            pending = nxt
        if pending is not None:
            yield self._ready(*pending)

    def _ready(self, x, y, event):
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            # made on the side stream, used (and freed) on the main one: tell the allocator
            x.record_stream(main)
            y.record_stream(torch.cuda.current_stream(self.label_device))
        return x, y


@functools.lru_cache(maxsize=None)
def side_stream(device: torch.device):
    """The CUDA stream batches are finished on, one per device for the process: a new one per epoch
    (per DeviceBatches) costs a stream creation and leaves the allocator one more stream's pools."""
    return torch.cuda.Stream(device)


__all__ = ["DeviceBatches", "side_stream"]
