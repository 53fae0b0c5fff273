"""The private torch APIs splitnet uses, each behind one function here.

torch has no public form of these; a torch release may rename or drop them. When one is missing the
function says so (PrivateAPIError naming the API and the torch version) or, where the caller can do
without it, falls back. This module imports nothing from splitnet: every layer may import it.
tests/test_compat.py checks each shim on the installed torch and with its API taken away.
"""
from __future__ import annotations

import torch


class PrivateAPIError(RuntimeError):
    """A private torch API splitnet relies on is not in this torch."""


def _missing(api: str, what: str) -> PrivateAPIError:
    return PrivateAPIError(f"{api} is not in torch {torch.__version__} (needed for {what}); "
                           "use a torch version where it exists (torch>=2.1 has it)")


def unscale_and_check_(grads: list, found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """GradScaler's fused kernel: g *= inv_scale for every g (one device and dtype), and found_inf = 1
    if any g is not finite (torch._amp_foreach_non_finite_check_and_unscale_)."""
    fn = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
    if fn is None:
        raise _missing("torch._amp_foreach_non_finite_check_and_unscale_", "fp16 loss scaling")
    fn(grads, found_inf, inv_scale)


def default_store():
    """The default process group's rendezvous store (torchrun's agent hosts it, so it outlives a
    failed rank): torch.distributed.distributed_c10d._get_default_store."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store
    except ImportError:
        raise _missing("torch.distributed.distributed_c10d._get_default_store",
                       "reading a failed rank's error") from None
    return _get_default_store()


def profile_all_threads() -> dict:
    """The torch.profiler.profile keywords that record every thread, not only the calling one
    (torch._C._profiler._ExperimentalConfig(profile_all_threads=True), torch >= 2.6); {} where this
    torch lacks it (the profiler then records the calling thread only)."""
    try:
        from torch._C._profiler import _ExperimentalConfig
        return {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):
        return {}


__all__ = ["PrivateAPIError", "default_store", "profile_all_threads", "unscale_and_check_"]


def torch_dispatch_mode():
    """The base class of a mode that intercepts aten operators below autograd and autocast
    (torch.utils._python_dispatch.TorchDispatchMode, the extension point of __torch_dispatch__)."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:
        raise _missing("torch.utils._python_dispatch.TorchDispatchMode",
                       "the emulated bf16 precisions (bf16_emu, bf16_emu_cl)") from None
    return TorchDispatchMode
