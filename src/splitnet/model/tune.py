"""Settling concurrency="auto" by timing the strategies on the model's own placement (§3.2: the
columns work in parallel; which way of running them is fastest depends on the device).

On the CPU emulation the rule in concurrent.choose comes from `make bench` on this project's
machines. On a GPU the answer depends on the card, the batch and the precision (two CUDA streams
against one queue), so training measures it once before the first step, as cudnn.benchmark does
for convolution algorithms: a few forward + backward passes of a random batch of the training
shape with each candidate, interleaved, the fastest kept in `model.tuned_strategy`.

Every strategy computes the same network (test_concurrent.py), and calibration touches nothing a
run depends on: the RNG states are restored, gradients are taken with autograd.grad (no .grad
accumulates), and the weights are not stepped.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .concurrent import candidates
from .placement import synchronize
from .precision import autocast, memory_format, numerics


def worth_calibrating(model) -> bool:
    """Training calibrates "auto" where no measured rule exists: a GPU placement with a choice."""
    return model.concurrency == "auto" and any(d.type == "cuda" for d in model.devices) and \
        len(candidates(model)) > 1


def calibrate(model, batch: int, steps: int = 3, strategies=None, mode: str = "fp32") -> dict:
    """Time one training pass (forward, cross-entropy, backward) of `model` at `batch` images with
    each strategy (default: concurrent.candidates), one warm-up round then `steps` timed rounds in
    turn; set model.tuned_strategy to the fastest (min over rounds) and return
    {"strategy": fastest, "step_s": {strategy: seconds}} (step_s empty when there is one candidate).
    mode: the numeric mode the run trains in (precision.py); the model is already in its memory format."""
    cands = list(strategies or candidates(model))
    if len(cands) < 2:
        model.tuned_strategy = cands[0]
        return {"strategy": cands[0], "step_s": {}}
    dev = model.devices[model.local[0]]
    head = model.devices[model.layout.head]
    g = torch.Generator().manual_seed(0)  # a private generator: the global RNG is not drawn
    side = model.input_side
    x = (torch.randn(batch, 3, side, side, generator=g) * 60).to(dev).contiguous(memory_format=memory_format(mode))
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g).to(head)
    params = [p for p in model.parameters() if p.requires_grad]
    requested = model.concurrency
    best = {s: float("inf") for s in cands}
    cuda = sorted({d.index or 0 for d in model.devices if d.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), numerics(mode):
            for rnd in range(steps + 1):
                for s in cands:
                    model.concurrency = s
                    synchronize(model.devices)
                    t0 = time.perf_counter()
                    with autocast(mode, dev.type):  # as train/epochs.py steps
                        loss = F.cross_entropy(model(x).float(), y)
                    torch.autograd.grad(loss, params)
                    synchronize(model.devices)
                    if rnd:  # round 0 warms up (cudnn's algorithm search, the allocator, threads)
                        best[s] = min(best[s], time.perf_counter() - t0)
    finally:
        model.concurrency = requested
    model.tuned_strategy = min(cands, key=best.get)
    return {"strategy": model.tuned_strategy, "step_s": best}


__all__ = ["calibrate", "worth_calibrating"]
