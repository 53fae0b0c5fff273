"""The paper's update rule against hand-computed steps (§5), and the schedules."""
import pytest
import torch

from splitnet.train.optim import MilestoneSchedule, PaperSGD, PlateauSchedule, drop_lr, param_groups


def _hand(w, v, g, eps, mu=0.9, wd=5e-4):
    v = mu * v - wd * eps * w - eps * g
    return w + v, v


def test_update_rule_by_hand_across_a_drop():
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = PaperSGD([p], lr=0.01, momentum=0.9, weight_decay=5e-4)
    grads = [torch.tensor([0.3, -0.1, 2.0]), torch.tensor([-1.0, 0.5, 0.2]), torch.tensor([0.7, 0.7, -0.3])]
    w, v = w0.clone(), torch.zeros(3, dtype=torch.float64)
    eps = 0.01
    for i, g in enumerate(grads):
        if i == 2:  # a learning-rate drop between steps 2 and 3
            drop_lr(opt, 10.0)
            eps = 0.001
        p.grad = g.double()
        opt.step()
        w, v = _hand(w, v, g.double(), eps)
        assert torch.allclose(p.detach(), w, rtol=0, atol=1e-15)
    # After the drop the old velocity keeps its full size (eps inside v): unlike torch.optim.SGD.
    q = torch.nn.Parameter(w0.clone())
    tsgd = torch.optim.SGD([q], lr=0.01, momentum=0.9, weight_decay=5e-4)
    for i, g in enumerate(grads):
        if i == 2:
            tsgd.param_groups[0]["lr"] = 0.001
        q.grad = g.double()
        tsgd.step()
    assert not torch.allclose(p.detach(), q.detach(), atol=1e-6)


def test_a_drop_that_scales_the_velocity_is_torch_sgd_across_the_drop():
    """drop_velocity "scale": dividing v with eps makes the paper's update exactly torch.optim.SGD's
    (eps outside the velocity) on both sides of the drop; "keep" (above) does not."""
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = PaperSGD([p], lr=0.01, momentum=0.9, weight_decay=5e-4)
    tsgd = torch.optim.SGD([q], lr=0.01, momentum=0.9, weight_decay=5e-4)
    grads = [torch.tensor([0.3, -0.1, 2.0]), torch.tensor([-1.0, 0.5, 0.2]), torch.tensor([0.7, 0.7, -0.3]),
             torch.tensor([0.1, -0.4, 0.9])]
    for i, g in enumerate(grads):
        if i == 2:
            assert drop_lr(opt, 10.0, velocity="scale") == pytest.approx(0.001)
            tsgd.param_groups[0]["lr"] = 0.001
        p.grad, q.grad = g.double(), g.double()
        opt.step()
        tsgd.step()
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-15)


def test_drop_velocity_must_be_keep_or_scale():
    from splitnet.train.config import ConfigError, OptimConfig
    assert OptimConfig().drop_velocity == "keep"  # the paper's rule unless an experiment says otherwise
    with pytest.raises(ConfigError, match="drop_velocity: 'halve'"):
        OptimConfig(drop_velocity="halve")


def test_same_as_torch_sgd_while_lr_constant():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    o1 = PaperSGD([a], lr=0.01)
    o2 = torch.optim.SGD([b], lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        g = torch.randn(10, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.allclose(a, b, atol=1e-12)


def test_biases_are_not_decayed_by_default():
    lin = torch.nn.Linear(3, 2).double()
    groups = param_groups(lin, 5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    opt = PaperSGD(groups, lr=0.1)
    b0 = lin.bias.detach().clone()
    lin.weight.grad = torch.zeros_like(lin.weight)
    lin.bias.grad = torch.zeros_like(lin.bias)
    w0 = lin.weight.detach().clone()
    opt.step()
    assert torch.equal(lin.bias.detach(), b0)  # zero gradient, no decay: unchanged
    assert torch.allclose(lin.weight.detach(), w0 * (1 - 5e-4 * 0.1))
    assert param_groups(lin, 5e-4, bias_decay=True)[1]["weight_decay"] == 5e-4


def test_plateau_schedule():
    s = PlateauSchedule(patience=2, max_drops=3)
    errs = [0.9, 0.8, 0.8, 0.81, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    drops = [e for e, err in enumerate(errs) if s.step(e, err)]
    assert drops == [3, 6, 8]  # two epochs without improvement each time, then no more than 3
    st = s.state_dict()
    s2 = PlateauSchedule(patience=2)
    s2.load_state_dict(st)
    assert s2.state_dict() == st


def test_milestone_schedule():
    s = MilestoneSchedule((23, 49))
    assert [e for e in range(90) if s.step(e)] == [22, 48]


def test_bad_args():
    with pytest.raises(ValueError, match="lr"):
        PaperSGD([torch.nn.Parameter(torch.zeros(1))], lr=-1)
