"""The one SGD step (train/step.py): the loop trains with it and the benchmarks time it; fp16's scaler
lives across the benchmark's calls and an overflowing step is skipped there as in training."""
import torch

from splitnet import SplitAlexNet
from splitnet.bench import timing
from splitnet.model.config import ModelConfig
from splitnet.train import epochs, step
from splitnet.train.scaler import LossScaler


def _net():
    torch.manual_seed(0)
    net = SplitAlexNet(10, config=ModelConfig(geometry="cifar"), devices=("cpu", "cpu"), concurrency="sequential")
    x = torch.randn(4, 3, net.input_side, net.input_side) * 60
    return net.train(), x, torch.randint(0, 10, (4,))


def test_loop_and_bench_share_one_step_function():
    assert epochs.sgd_step is step.sgd_step and timing.sgd_step is step.sgd_step


def test_bench_step_equals_the_training_step():
    """timing.train_step and sgd_step with a run's scaler leave bitwise the same weights (fp32)."""
    res = []
    for use_bench in (True, False):
        net, x, y = _net()
        opt = timing.paper_optimizer(net)
        for s in range(2):
            if use_bench:
                timing.train_step(net, opt, x, y, step=s, seed=7)
            else:
                step.sgd_step(net, opt, x, y, LossScaler(False), timing._LOCAL, step=s, seed=7, mode="fp32")
        res.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*res))


def test_bench_fp16_step_skips_an_overflow_and_keeps_its_scaler(monkeypatch):
    """An overflow (as float16 leaves it) in the benchmark's step: the update is skipped (weights as
    they were) and the halved scale carries to the next call, as training's scaler does."""
    net, x, y = _net()
    opt = timing.paper_optimizer(net)
    monkeypatch.setattr(LossScaler, "unscale_and_check", lambda self, params: True)
    before = [p.detach().clone() for p in net.parameters()]
    timing.train_step(net, opt, x, y, step=0, mode="fp16")
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert timing._SCALERS[opt].scale == 2.0 ** 15
    timing.train_step(net, opt, x, y, step=1, mode="fp16")
    assert timing._SCALERS[opt].scale == 2.0 ** 14
