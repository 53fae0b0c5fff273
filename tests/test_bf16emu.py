"""precision = "bf16_emu" / "bf16_emu_cl" (model/bf16emu.py): bf16 arithmetic computed in float32.

Against formulas: each emulated operator's result is the float64 result of the same bf16 operands,
rounded once to bf16 (what a float32-accumulating bf16 kernel gives). Against torch's own bf16
autocast: the same forward pass. Across strategies: the column threads emulate too. And a run."""
import json
import threading

import pytest
import torch
import torch.nn.functional as F

from cpuenv import CPU_DEVICES
from helpers import losses, tiny_cfg, train_recs
from splitnet.compat import PrivateAPIError
from splitnet.model import bf16emu
from splitnet.model.columns import SplitAlexNet
from splitnet.model.config import ModelConfig
from splitnet.model.precision import autocast, emulated, memory_format, numerics, precision
from splitnet.train.loop import train


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _bf16(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def _correctly_rounded(got, ref64):
    """got (bf16) is ref64 rounded to bf16 up to the order of a float32 sum: its error is the
    rounding's own, and all but a few elements are the rounded value itself."""
    assert got.dtype == torch.bfloat16
    alone = _rel(ref64.bfloat16(), ref64)
    assert _rel(got, ref64) < 1.02 * alone, (_rel(got, ref64), alone)
    assert (got == ref64.bfloat16()).double().mean() > 0.99


def test_convolution_forward_and_backward_are_correctly_rounded():
    x = _bf16(8, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    w, b = _bf16(32, 16, 5, 5, scale=0.05, seed=1), _bf16(32, seed=2)
    go = _bf16(8, 32, 10, 10, seed=3)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    with bf16emu.emulating():
        y = F.conv2d(xe, we, b, padding=2)
        y.backward(go)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    yd = F.conv2d(xd, wd, b.double(), padding=2)
    yd.backward(go.double())
    _correctly_rounded(y, yd)
    assert y.is_contiguous(memory_format=torch.channels_last)  # as a native kernel's output
    _correctly_rounded(xe.grad, xd.grad)
    _correctly_rounded(we.grad, wd.grad)


def test_matrix_products_are_correctly_rounded_and_float32_is_untouched():
    a, m, bias = _bf16(64, 256), _bf16(256, 10, seed=1), _bf16(10, seed=2)
    with bf16emu.emulating():
        mm, addmm = a @ m, torch.addmm(bias, a, m)
        bmm = torch.bmm(a.view(4, 16, 256), m.expand(4, 256, 10))
        f32 = a.float() @ m.float()  # float32 operands: not emulated, not rounded
    _correctly_rounded(mm, a.double() @ m.double())
    _correctly_rounded(addmm, bias.double() + a.double() @ m.double())
    _correctly_rounded(bmm, (a.double() @ m.double()).view(4, 16, 10))
    assert f32.dtype == torch.float32 and torch.equal(f32, a.float() @ m.float())
    assert not bf16emu.active()


def _net(seed=0):
    torch.manual_seed(seed)
    return SplitAlexNet(config=ModelConfig(num_classes=10, geometry="cifar"), devices=("cpu", "cpu")).eval()


def _logits(net, mode, x):
    with torch.no_grad(), precision(mode, "cpu"):
        return net(x.contiguous(memory_format=memory_format(mode))).float()


def test_emulated_forward_is_bf16_autocasts_forward():
    """torch's bf16 convolutions accumulate their forward in float32, as the emulation does (on an AVX2
    CPU they add the bias after one more rounding: a few elements 1 ulp apart): the logits are 6.7x
    closer to bf16 autocast's than to float32's (measured 3.6e-4 against 2.4e-3; asserted 4x)."""
    net = _net()
    x = torch.randn(16, 3, net.input_side, net.input_side, generator=torch.Generator().manual_seed(4)) * 60
    fp32, real, emu = (_logits(net, m, x) for m in ("fp32_cl", "bf16_cl", "bf16_emu_cl"))
    assert not torch.equal(emu, fp32)
    assert _rel(emu, real) < 0.25 * _rel(emu, fp32), (_rel(emu, real), _rel(emu, fp32))


def _record_emulated(monkeypatch) -> list:
    """[(thread name, operator)] of every emulated call from now on."""
    calls = []
    real = bf16emu._emulate

    def recorded(func, args, kwargs):
        calls.append((threading.current_thread().name, func))
        return real(func, args, kwargs)
    monkeypatch.setattr(bf16emu, "_emulate", recorded)
    return calls


def test_column_threads_emulate_as_well(monkeypatch):
    net = _net()
    net.concurrency = "threads"
    x = torch.randn(8, 3, net.input_side, net.input_side) * 60
    calls = _record_emulated(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _logits(net, "bf16_emu_cl", x)
        net.concurrency = "sequential"
        ref = _logits(net, "bf16_emu_cl", x)
    finally:
        torch.set_num_threads(threads)
    assert any(n.startswith("splitnet-column") for n, _ in calls), {n for n, _ in calls}
    assert torch.equal(got, ref)


def test_a_run_in_emulated_bf16_tracks_fp32_and_emulates_its_backward(cache32, tmp_path, monkeypatch):
    cfg = lambda mode: tiny_cfg(cache32, CPU_DEVICES, "max_steps=3", f'precision="{mode}"')
    train(cfg("fp32_cl"), tmp_path / "fp32", progress=False)
    calls = _record_emulated(monkeypatch)
    train(cfg("bf16_emu_cl"), tmp_path / "emu", progress=False)
    ops = {f for _, f in calls}
    assert torch.ops.aten.convolution_backward.default in ops and torch.ops.aten.addmm.default in ops
    ref, got = losses(tmp_path / "fp32"), losses(tmp_path / "emu")
    assert len(got) == 3 and got != ref
    assert all(abs(a - b) < 0.02 * b for a, b in zip(got, ref)), (got, ref)
    assert json.loads((tmp_path / "emu" / "run.json").read_text())["precision"] == "bf16_emu_cl"
    assert all("loss_scale" not in r for r in train_recs(tmp_path / "emu"))  # bf16 needs no scaler


def test_modes_and_the_missing_base_class(monkeypatch):
    assert emulated("bf16_emu") and emulated("bf16_emu_cl") and not emulated("bf16_cl")
    with numerics("bf16_emu"):
        assert bf16emu.active()
        with autocast("bf16_emu", "cpu"):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not bf16emu.active()
    import torch.utils._python_dispatch as pd
    monkeypatch.setattr(bf16emu, "_mode_class", None)
    monkeypatch.delattr(pd, "TorchDispatchMode")
    with pytest.raises(PrivateAPIError, match="TorchDispatchMode"):
        with numerics("bf16_emu"):
            pass
    assert not bf16emu.active()
