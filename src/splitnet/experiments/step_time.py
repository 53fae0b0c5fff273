"""The ablation table's step-time column: each experiment's training step relative to `paper`'s,
timed interleaved in this process on same-sized random batches, before any training (ablate.py)."""
from __future__ import annotations

import statistics

import torch

from ..bench.timing import paper_optimizer, timed, train_step
from ..model.columns import SplitAlexNet
from ..model.precision import memory_format, numerics


def _timing_model(cfg) -> tuple:
    """The experiment's model, optimiser and a random batch, held as its training run holds them (the
    precision's memory format), and the precision: the arguments of _step."""
    torch.manual_seed(0)
    m = SplitAlexNet(num_classes=10, config=cfg.model, devices=tuple(cfg.devices) or None,
                     concurrency=cfg.concurrency).train()
    fmt = memory_format(cfg.precision)
    m.to(memory_format=fmt)
    b = cfg.batch_size
    x = (torch.randn(b, 3, m.input_side, m.input_side) * 60).to(m.devices[0]).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (b,)).to(m.devices[m.layout.head])
    return m, paper_optimizer(m, cfg.optim), x, y, cfg.precision


def _step(m, opt, x, y, mode: str) -> float:
    """Seconds of one training step as `splitnet train` takes it (bench/timing.py train_step: dropout
    streams, forward and loss under the precision, backward, the PaperSGD update)."""
    with numerics(mode):
        return timed(lambda: train_step(m, opt, x, y, mode=mode), sorted(set(m.devices), key=str))


def step_times(paper_cfg, cfgs: dict, reps: int = 2) -> dict:
    """Training step time (the whole step, in the run's precision and memory format: _step) of each
    config's model relative to the paper's, each timed interleaved with the paper model on same-sized
    random batches, in this process (median of `reps` after a warm-up). Two models in memory at a time."""
    paper = _timing_model(paper_cfg)
    _step(*paper)
    rel = {}
    for name, cfg in cfgs.items():
        if name == "paper":
            rel[name] = 1.0
            continue
        other = _timing_model(cfg)
        _step(*other)
        tp, to = [], []
        for _ in range(reps):
            tp.append(_step(*paper))
            to.append(_step(*other))
        rel[name] = statistics.median(to) / statistics.median(tp)
        del other
    return rel
