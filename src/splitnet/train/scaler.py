"""Dynamic loss scaling for float16 training (precision "fp16" / "fp16_cl", model/precision.py).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero. The loss is multiplied by a scale
(2**16 at the start) before backward, so the float16 gradients sit higher in the range, and the
float32 parameter gradients are divided by it before the update. When a gradient overflows (inf or
NaN) the step is skipped and the scale halved; after `growth_interval` steps without overflow it
doubles. Scales are powers of two, so scaling and unscaling are exact.

Written here rather than taken from torch.amp.GradScaler because GradScaler decides per process:
under torchrun every rank holds a different column's parameters, one rank's gradients can overflow
while another's do not, and all must skip the same steps. So the scaler only reports this process's
overflow (unscale_and_check); the loop agrees on it over the ranks (runtime.agree, in the step's one
collective) and passes the agreed flag to update(). Every rank then holds the same scale.

A disabled scaler (fp32, tf32, bf16) does nothing and costs nothing per step.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..compat import unscale_and_check_

# Below this the scale cannot be what makes the gradients overflow (float16's smallest subnormal is
# 2**-24): training stops instead of skipping every step.
MIN_SCALE = 2.0 ** -24


class LossScaler:
    """scale_loss(loss) -> backward -> unscale_and_check(params) -> (agree) -> update(overflow)."""

    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if init_scale <= 0:
            raise ValueError(f"LossScaler: init_scale must be > 0, got {init_scale}")
        self.enabled = enabled
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.growth_tracker = 0  # steps without overflow since the last change of scale

    def scale_loss(self, loss):
        """The loss to backpropagate (None stays None: a distributed rank without the head column)."""
        if not self.enabled or loss is None:
            return loss
        return loss * self.scale

    def unscale_and_check(self, params) -> bool:
        """Divide the gradients of `params` by the scale, in place; True when any of them holds an
        inf or NaN (this process's gradients only: agree on it before update())."""
        if not self.enabled:
            return False
        groups = defaultdict(list)  # the fused kernel takes the tensors of one device and dtype
        for p in params:
            if p.grad is not None:
                groups[(p.grad.device, p.grad.dtype)].append(p.grad)
        total = None
        for (device, _), grads in groups.items():
            inf = torch.zeros(1, device=device)
            # GradScaler's kernel: g *= inv_scale for every g, and inf = 1 if any g is not finite
            unscale_and_check_(grads, inf, torch.full((1,), 1.0 / self.scale, device=device))
            total = inf if total is None else total + inf.to(total.device)
        return total is not None and total.item() > 0  # one device-to-host read for all devices

    def update(self, overflow: bool) -> None:
        """After the agreed overflow flag: back off on overflow, else grow after growth_interval steps."""
        if not self.enabled:
            return
        if overflow:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker >= self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0

    @property
    def exhausted(self) -> bool:
        """The scale has backed off below MIN_SCALE: the gradients overflow whatever the scale."""
        return self.enabled and self.scale < MIN_SCALE

    def state_dict(self) -> dict:
        """What a resume needs ({} when disabled); numbers only (checkpoints load weights_only)."""
        if not self.enabled:
            return {}
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, st: dict) -> None:
        if self.enabled and st:
            self.scale, self.growth_tracker = float(st["scale"]), int(st["growth_tracker"])


__all__ = ["LossScaler", "MIN_SCALE"]
