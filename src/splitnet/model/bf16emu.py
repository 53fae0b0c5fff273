"""bf16 arithmetic at float32 speed, for CPUs without bf16 units: the precisions bf16_emu, bf16_emu_cl.

Why: on a CPU without AVX-512 BF16 or AMX, torch runs a bf16 convolution in its reference im2col
kernels (aten::_slow_conv2d_forward/_backward): a CIFAR-scale bf16_cl training step took 15x
fp32_cl's on an AVX2 EPYC (docs/results.md), which puts "do the findings hold in bf16?" out of reach
of such a machine. Those kernels are not even the arithmetic of bf16 hardware: their backward sums
partial gradients in bf16 (3.5x the error of one final rounding, docs/results.md), where oneDNN's
kernels on AMX and cuDNN's accumulate in float32 and round once.

What it computes: the operators autocast sends to bf16 that carry the arithmetic (convolution forward
and backward, mm, addmm, bmm, baddbmm) are computed in float32 from their bf16 operands and their
results rounded to bf16 (round to nearest even). A product of two bf16 numbers (8-bit significands)
is exact in float32 (24 bits), so this is a native kernel's result: float32 accumulation, one
rounding, up to the order of the sum. Every other operator (ReLU, pooling, dropout, the loss) runs in
bf16 as autocast has it; the LRN is float32 under any autocast (layers.py).

For numerics only: its speed (about fp32's at the CIFAR scale) says nothing about bf16 hardware.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .. import compat

_aten = torch.ops.aten
# The operators whose arithmetic is emulated. Under autocast, conv2d and linear reach them.
EMULATED_OPS = frozenset({_aten.convolution.default, _aten.convolution_backward.default,
                          _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default})

_tls = threading.local()  # .on: inside emulating(True) in this thread (modes are thread-local in torch)
_mode_class = None


def _is_bf16(a) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16


def _up(a):
    """A bf16 tensor as float32 (the same values, its memory format kept); anything else as it is."""
    return a.float() if _is_bf16(a) else a


def _down(t):
    return t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t


def _emulate(func, args, kwargs):
    """func in float32 on the bf16 operands, its results rounded to bf16 (None outputs of
    convolution_backward stay None)."""
    out = func(*[_up(a) for a in args], **{k: _up(v) for k, v in kwargs.items()})
    return tuple(_down(t) for t in out) if isinstance(out, (tuple, list)) else _down(out)


def _mode():
    """The TorchDispatchMode subclass, built on first use (its base is a private torch API)."""
    global _mode_class
    if _mode_class is None:
        class EmulatedBF16(compat.torch_dispatch_mode()):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in EMULATED_OPS and any(map(_is_bf16, args)):
                    return _emulate(func, args, kwargs)
                return func(*args, **kwargs)
        _mode_class = EmulatedBF16
    return _mode_class


def active() -> bool:
    """Whether this thread computes under emulating(True)."""
    return getattr(_tls, "on", False)


@contextlib.contextmanager
def emulating(on: bool = True):
    """bf16 arithmetic emulated in this thread while inside (nothing when `on` is false, nor when it
    is already active: one mode, not nested ones). Hold it around forward and backward: backward's
    convolution_backward runs outside autocast."""
    if not on or active():
        yield
        return
    _tls.on = True
    try:
        with _mode()():
            yield
    finally:
        _tls.on = False


__all__ = ["EMULATED_OPS", "active", "emulating"]
