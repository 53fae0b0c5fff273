"""One SGD step (§5): the step `splitnet train` takes (epochs.py) and the benchmarks time (bench/timing.py).

One function for both, so that what the benchmarks time is what training runs: dropout masks of the
(seed, step) stream (§4.2), forward and loss under the precision's autocast, backward and gradient
sync through the runtime, fp16's loss scaling (an overflowing step is skipped, the scale backs off),
the agreement over ranks, and the PaperSGD update.

The loss and the training error stay on the device: reading them (`.item()`) every step would make
the host wait for the GPU at every step, so it could not queue the next one. The loop reads them
every log_every steps (epochs.py). fp16 alone still reads one flag per step: whether to skip the update
is a host decision that every rank must agree on (scaler.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.rng import derive_seed
from ..model.precision import autocast

STREAM_DROPOUT = 3  # derive_seed stream for dropout masks (data/rng.py uses 1 and 2)


@dataclass
class StepResult:
    """What one step leaves, agreed over the ranks (runtime.agree)."""

    loss: torch.Tensor | float | None  # the unscaled loss: a device tensor in one process, not read yet
    err: torch.Tensor | float | None  # the batch's top-1 training error, likewise
    overflow: bool  # fp16: the gradients overflowed on some rank, the update was skipped
    signalled: bool  # a stop signal came to some rank
    elapsed: float  # the run's clock, agreed
    scale: float  # the loss scale this step's backward used (1 unless fp16)


def sgd_step(model, opt, x, y, scaler, rt, *, step: int, seed: int, mode: str, full_batch: int | None = None,
             offset: int = 0, signalled=False, elapsed=0.0) -> StepResult:
    """One step on x [b, 3, S, S], y [b] already on the devices (model in train mode). full_batch /
    offset: this process's rows of the global batch (data parallel), so every placement draws the
    same dropout masks. A model without dropout streams (the grouped network) draws from the global
    RNG. `scaler` (train/scaler.py) must live as long as the run: a fresh one per step would restart
    at 2**16 and skip steps that training would take. signalled / elapsed: values, or callables read
    after backward (the run's stop flag and clock as they stand when the step's work is done: a
    budget checked against the clock before the step would let one more step through)."""
    if hasattr(model, "set_dropout_stream"):
        model.set_dropout_stream(derive_seed(seed, STREAM_DROPOUT, step), full_batch or len(x), offset)
    with autocast(mode, x.device.type):  # forward and loss; backward follows the forward's dtypes
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y) if logits is not None else None
    opt.zero_grad(set_to_none=True)
    rt.backward(model, scaler.scale_loss(loss))  # fp16: the scaled loss; unscaled after the replicas' average
    rt.sync_grads(model)
    overflow = scaler.unscale_and_check(model.parameters())  # this rank's gradients; agreed below
    err = (logits.argmax(1) != y).float().mean() if logits is not None else None
    lv = loss.detach() if loss is not None else None
    signalled, elapsed = (v() if callable(v) else v for v in (signalled, elapsed))
    lv, err, signalled, elapsed, overflow = rt.agree(lv, err, signalled, elapsed, overflow)
    scale = scaler.scale
    scaler.update(overflow)
    if not overflow:  # a skipped step leaves weights and velocities as they were
        opt.step()
    return StepResult(lv, err, overflow, signalled, elapsed, scale)


def host_floats(values) -> list:
    """Python floats of device scalars (one transfer for all of them) or of floats. Bitwise the
    values .item() would give: the tensors are float32 and go to float64 unchanged."""
    values = list(values)
    if values and all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack(values).tolist()
    return [float(v) for v in values]


__all__ = ["STREAM_DROPOUT", "StepResult", "sgd_step", "host_floats"]
