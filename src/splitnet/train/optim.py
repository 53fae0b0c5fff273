"""The paper's SGD update and learning-rate schedule (§5).

    v <- 0.9 v - 0.0005 * eps * w - eps * <dL/dw>_batch
    w <- w + v

The learning rate eps sits inside the velocity. torch.optim.SGD keeps it outside
(v <- mu v + g; w <- w - lr v): the same while eps is constant, different right after a drop, where
torch shrinks the stored velocity at once and the paper's decays over ~10 steps. The original code
applies weight decay to weights only (biases: wc = 0), which is the default here.
"""
from __future__ import annotations

import torch


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay exactly as §5 writes it (eps inside the velocity)."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"PaperSGD: lr, momentum and weight_decay must be >= 0 "
                             f"(got {lr}, {momentum}, {weight_decay})")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            vs = []
            for p in params:
                st = self.state[p]
                if "velocity" not in st:
                    st["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                vs.append(st["velocity"])
            grads = [p.grad for p in params]
            # v = mu v - wd*eps*w - eps*g, then w += v; foreach ops keep it one kernel per step.
            torch._foreach_mul_(vs, mu)
            if wd:
                torch._foreach_add_(vs, params, alpha=-wd * lr)
            torch._foreach_add_(vs, grads, alpha=-lr)
            torch._foreach_add_(params, vs)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float, bias_decay: bool = False) -> list:
    """Two groups: weights with decay, biases with decay only if bias_decay (the code's wc=0)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if name.endswith("bias") else weights).append(p)
    return [{"params": weights, "weight_decay": weight_decay, "name": "weights"},
            {"params": biases, "weight_decay": weight_decay if bias_decay else 0.0, "name": "biases"}]


class PlateauSchedule:
    """Divide eps by `factor` when validation error has not improved for `patience` epochs (§5),
    at most `max_drops` times (the paper: three drops before the end)."""

    def __init__(self, patience: int = 5, factor: float = 10.0, max_drops: int = 3, min_delta: float = 0.0):
        self.patience, self.factor, self.max_drops, self.min_delta = patience, factor, max_drops, min_delta
        self.best = float("inf")
        self.bad_epochs = 0
        self.drops = 0

    def step(self, epoch: int, val_err: float | None) -> bool:
        """Call after each epoch's evaluation; True when eps should be divided now."""
        if val_err is None:
            return False
        if val_err < self.best - self.min_delta:
            self.best, self.bad_epochs = val_err, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience and self.drops < self.max_drops:
            self.drops += 1
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "drops": self.drops}

    def load_state_dict(self, st: dict) -> None:
        self.best, self.bad_epochs, self.drops = float(st["best"]), int(st["bad_epochs"]), int(st["drops"])


class MilestoneSchedule:
    """Divide eps by `factor` at the start of each listed epoch (the 2012 run: epochs 23 and 49)."""

    def __init__(self, milestones=(23, 49), factor: float = 10.0):
        self.milestones, self.factor = tuple(sorted(milestones)), factor
        self.drops = 0

    def step(self, epoch: int, val_err: float | None = None) -> bool:
        """Call after finishing epoch `epoch` (0-based); True when epoch+1 is a milestone."""
        if epoch + 1 in self.milestones:
            self.drops += 1
            return True
        return False

    def state_dict(self) -> dict:
        return {"drops": self.drops}

    def load_state_dict(self, st: dict) -> None:
        self.drops = int(st["drops"])


def drop_lr(optimizer: torch.optim.Optimizer, factor: float, velocity: str = "keep") -> float:
    """Divide every group's eps. velocity "keep" (the paper's rule, eps inside v): the velocity is
    left alone, so the steps it holds, taken at the old eps, still carry the weights about 10 v
    further while the new gradients pull 10x more weakly; at the edge of stability that coasting
    can throw the loss up for tens of steps (measured: 0.5 -> 5.0 within 3 steps of a budget drop).
    "scale": the velocity is divided too, as if its steps had been taken at the new eps (what
    torch.optim.SGD, eps outside v, does implicitly)."""
    for g in optimizer.param_groups:
        g["lr"] /= factor
        if velocity == "scale":
            for p in g["params"]:
                v = optimizer.state.get(p, {}).get("velocity")
                if v is not None:
                    v.div_(factor)
    return optimizer.param_groups[0]["lr"]
