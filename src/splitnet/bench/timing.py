"""The clock of the benchmarks and the training step they time: the step `splitnet train` takes
(train/step.py sgd_step, shared with train/epochs.py), with its optimiser, dropout and concurrency
strategy."""
from __future__ import annotations

import math
import statistics
import time
import weakref

import torch

from ..model.placement import synchronize
from ..model.precision import needs_loss_scaling
from ..model.tune import calibrate, worth_calibrating
from ..train.config import OptimConfig
from ..train.optim import PaperSGD, param_groups
from ..train.runtime import LocalRuntime
from ..train.scaler import LossScaler
from ..train.step import sgd_step

_LOCAL = LocalRuntime()
_SCALERS = weakref.WeakKeyDictionary()  # optimiser -> its LossScaler (train_step)


def paper_optimizer(net: torch.nn.Module, cfg: OptimConfig | None = None) -> PaperSGD:
    """The optimiser training builds (§5): PaperSGD, weight decay on the weights only, eps 0.01,
    momentum 0.9 (OptimConfig's defaults)."""
    cfg = cfg or OptimConfig()
    return PaperSGD(param_groups(net, cfg.weight_decay, cfg.bias_decay), lr=cfg.lr, momentum=cfg.momentum)


def train_step(net, opt, x, y, step: int = 0, mode: str = "fp32", rt=_LOCAL, full_batch: int | None = None,
               offset: int = 0, seed: int = 0) -> None:
    """One SGD step as `splitnet train` takes it: train/step.py sgd_step, the very function the loop
    calls, on x [b, 3, S, S] and y [b] already on the devices (the net in train mode). One loss
    scaler per optimiser, kept between calls as a run keeps its own (fp16: a fresh 2**16 scale per
    call would skip the first steps' updates and flatter the time)."""
    scaler = _SCALERS.get(opt)
    if scaler is None or scaler.enabled != needs_loss_scaling(mode):
        scaler = _SCALERS[opt] = LossScaler(needs_loss_scaling(mode))
    sgd_step(net, opt, x, y, scaler, rt, step=step, seed=seed, mode=mode, full_batch=full_batch, offset=offset)


def training_strategy(model, batch: int, mode: str = "fp32") -> str:
    """The concurrency strategy `splitnet train` would run `model` with: "auto" as concurrent.choose
    resolves it, after tune.calibrate has timed the candidates where training does (a GPU placement
    with a choice, at the run's batch and precision). The model's own setting is left as it was."""
    saved = model.concurrency, model.tuned_strategy
    model.concurrency = "auto"
    try:
        if worth_calibrating(model):
            calibrate(model, batch, mode=mode)
        return model.strategy
    finally:
        model.concurrency, model.tuned_strategy = saved


def timed(fn, devices) -> float:
    """Seconds of fn(), the devices synchronised before and after."""
    synchronize(devices)
    t0 = time.perf_counter()
    fn()
    synchronize(devices)
    return time.perf_counter() - t0


def spread(values) -> dict:
    """Median and range of repeated measurements: {"median", "min", "max", "n"}, and from 6 of them on
    "ci95": a confidence interval of the median (median_ci)."""
    values = list(values)
    out = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
    ci = median_ci(values)
    if ci is not None:
        out["ci95"] = ci
    return out


def median_ci(values, level: float = 0.95):
    """[x_(k), x_(n+1-k)] of the sorted values, the order statistics that bracket the median with
    probability >= level whatever the distribution (the sign test's interval: the number of values
    below the true median is Binomial(n, 1/2)); None when n is too small for that (n < 6 at 95%)."""
    xs, n = sorted(values), len(values)
    k, below = 0, 0.0  # below = P(Binomial(n, 1/2) <= k - 1), the interval's miss on one side
    while True:
        nxt = below + math.comb(n, k) / 2 ** n
        if 2 * nxt > 1 - level:
            break
        below, k = nxt, k + 1
    return None if k == 0 else [xs[k - 1], xs[n - k]]
