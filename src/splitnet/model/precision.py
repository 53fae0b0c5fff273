"""Numeric modes for training, evaluation and the benchmark on GPUs (the paper trained in fp32, §5).

  fp32     plain float32 (the default: the paper's arithmetic).
  fp32_cl  float32 with the conv weights and the input in channels_last (NHWC) memory format: the
           same arithmetic, a different memory order. On a CPU the small CIFAR-scale network trains
           faster in it (overlapping max pooling is several times faster in NHWC; docs/results.md).
  tf32     float32 tensors, TF32 tensor-core matmuls and convolutions (Ampere and later GPUs).
  bf16     TF32 plus bfloat16 autocast: convolutions and fc layers in bf16, weights, SGD update and
           loss in float32 (torch.autocast keeps the reductions that need it in float32).
  bf16_cl  bf16 with the conv weights and the input in channels_last (NHWC) memory format, which
           the tensor-core convolution kernels prefer.
  fp16     TF32 plus float16 autocast, for GPUs with fp16 tensor cores but no bf16 (pre-Ampere:
           V100, T4, GTX 10xx/RTX 20xx). float16 keeps 10 mantissa bits but only 5 exponent bits
           (largest 65504, smallest normal 6e-5): small gradients underflow to zero, so training
           scales the loss before backward and the gradients back after (train/scaler.py), skipping
           the steps whose gradients overflow. Weights, SGD update and loss stay float32.
  fp16_cl  fp16 with channels_last, as bf16_cl.
  bf16_emu, bf16_emu_cl
           bf16 / bf16_cl with the arithmetic of bf16 hardware emulated in float32 (bf16emu.py): the
           numbers of a bf16 run on a CPU without bf16 units, at about fp32's speed. For numerics
           studies only (does a finding hold in bf16?), not for speed.

On the CPU the TF32 switches do nothing; bf16 and fp16 autocast run (slowly on CPUs without such
units): the tests use them to check those paths' correctness, not their speed.
"""
from __future__ import annotations

import contextlib

import torch

from . import bf16emu

# mode: (TF32 allowed, autocast dtype or None, channels_last, bf16 arithmetic emulated in float32)
PRECISIONS = {
    "fp32": (False, None, False, False),
    "fp32_cl": (False, None, True, False),
    "tf32": (True, None, False, False),
    "bf16": (True, torch.bfloat16, False, False),
    "bf16_cl": (True, torch.bfloat16, True, False),
    "fp16": (True, torch.float16, False, False),
    "fp16_cl": (True, torch.float16, True, False),
    "bf16_emu": (True, torch.bfloat16, False, True),
    "bf16_emu_cl": (True, torch.bfloat16, True, True),
}


def check(mode: str) -> str:
    if mode not in PRECISIONS:
        raise ValueError(f"precision: {mode!r} is not one of {', '.join(PRECISIONS)}")
    return mode


def autocast_dtype(mode: str):
    """The autocast dtype of `mode` (None: no autocast)."""
    return PRECISIONS[check(mode)][1]


def needs_loss_scaling(mode: str) -> bool:
    """Whether training in `mode` needs a loss scaler: float16's narrow exponent range loses small
    gradients; bfloat16 has float32's range and needs none."""
    return autocast_dtype(mode) == torch.float16


def memory_format(mode: str) -> torch.memory_format:
    return torch.channels_last if PRECISIONS[check(mode)][2] else torch.contiguous_format


@contextlib.contextmanager
def tf32(mode: str):
    """The TF32 switches of `mode` (process-wide torch flags, restored after). They govern the
    backward pass too, so a training run holds them for the whole run. Newer torch (fp32_precision)
    deprecates the allow_tf32 flags and warns when both are used: one API or the other, never both."""
    allow = PRECISIONS[check(mode)][0]
    flags = _tf32_flags()
    saved = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, values in flags:
        setattr(obj, name, values[allow])
    try:
        yield
    finally:
        for (obj, name, _), v in zip(flags, saved):
            setattr(obj, name, v)


def emulated(mode: str) -> bool:
    """Whether `mode` emulates bf16 arithmetic in float32 (bf16emu.py)."""
    return PRECISIONS[check(mode)][3]


@contextlib.contextmanager
def numerics(mode: str):
    """What a run of `mode` holds from its first step to its last evaluation, forward and backward:
    the TF32 switches and, for the emulated modes, bf16emu.emulating (backward runs outside autocast)."""
    with tf32(mode), bf16emu.emulating(emulated(mode)):
        yield


def tf32_allowed() -> bool:
    """Whether TF32 matmuls are allowed now, read through the API tf32() sets (torch raises when a
    flag set through one API is read through the other)."""
    obj, name, values = _tf32_flags()[0]
    return getattr(obj, name) == values[True]


def _tf32_flags() -> list:
    """[(object, attribute, (value without TF32, value with))] for matmuls and convolutions."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(b.cudnn, "conv"):
        # cuDNN's RNN flag too: torch <= 2.11 raises on a read of cuDNN's TF32 setting that names
        # neither conv nor rnn when the two differ (pytorch issue 179445)
        return [(b.cuda.matmul, "fp32_precision", ("ieee", "tf32")),
                (b.cudnn.conv, "fp32_precision", ("ieee", "tf32"))] + (
            [(b.cudnn.rnn, "fp32_precision", ("ieee", "tf32"))] if hasattr(b.cudnn, "rnn") else [])
    return [(b.cuda.matmul, "allow_tf32", (False, True)), (b.cudnn, "allow_tf32", (False, True))]


def autocast(mode: str, device_type: str):
    """torch.autocast for `mode` (disabled unless bf16 or fp16): around the forward pass and the loss only;
    backward follows the forward's dtypes by itself."""
    dtype = autocast_dtype(mode)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@contextlib.contextmanager
def precision(mode: str, device_type: str):
    """Both: numerics() and autocast for one mode (the benchmark times whole steps inside it)."""
    with numerics(mode), autocast(mode, device_type):
        yield


__all__ = ["PRECISIONS", "precision", "numerics", "emulated", "tf32", "tf32_allowed", "autocast", "memory_format", "autocast_dtype", "needs_loss_scaling",
           "check"]
