"""tune.calibrate: concurrency="auto" settled by timing the strategies on the model's placement. It
keeps the faster one and leaves everything a run depends on (weights, .grad, RNG) as it was."""
import time

import pytest
import torch

import splitnet
from splitnet.model import concurrent as C
from splitnet.model.tune import calibrate, worth_calibrating


def _model():
    torch.manual_seed(0)
    return splitnet.SplitAlexNet(10, "paper", devices="cpu").train()


def _slowed(fn, seconds=3.0):  # far above the two strategies' own difference, even on a loaded CPU
    def slow(*a, **k):
        time.sleep(seconds)
        return fn(*a, **k)
    return slow


@pytest.mark.parametrize("slow", ["threads", "sequential"])
def test_keeps_the_faster_strategy(monkeypatch, slow):
    torch.set_num_threads(2)
    m = _model()
    if slow == "threads":
        monkeypatch.setattr(C, "threads_forward", _slowed(C.threads_forward))
    else:
        monkeypatch.setattr(m, "forward_columns", _slowed(m.forward_columns))
    res = calibrate(m, 2, steps=1, strategies=["threads", "sequential"])
    other = "sequential" if slow == "threads" else "threads"
    assert res["strategy"] == other == m.tuned_strategy == m.strategy
    assert res["step_s"][slow] > res["step_s"][other] + 0.5  # the added seconds, less noise
    assert m.concurrency == "auto"


def test_touches_nothing_a_run_depends_on():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(5)
    calibrate(m, 2, steps=1, strategies=["threads", "sequential"])  # dropout draws from the global RNG
    after_rng = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_rng, torch.rand(3))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in m.parameters())
    assert m.training


def test_an_explicit_request_is_not_overridden():
    m = splitnet.SplitAlexNet(10, "paper", devices="cpu", concurrency="sequential")
    m.tuned_strategy = "threads"
    assert m.strategy == "sequential"


def test_candidates_and_when_training_calibrates():
    m = _model()
    torch.set_num_threads(2)
    assert C.candidates(m) == ["threads", "sequential"]
    torch.set_num_threads(1)  # one core: the columns cannot have one each
    try:
        assert C.candidates(m) == ["sequential"]
        assert calibrate(m, 2)["strategy"] == "sequential"  # nothing to time
    finally:
        torch.set_num_threads(2)
    assert not worth_calibrating(m)  # the CPU rule is measured (make bench); GPUs calibrate
