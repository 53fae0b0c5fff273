"""Where a training run is: everything besides weights and velocities that a resume must restore."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    """Round-trips through the checkpoint (to_checkpoint / from_checkpoint), so a resumed run takes
    the same batches, dropout masks, learning rates and budget decisions as an uninterrupted one."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # epochs done
    batch: int = 0  # batches of the current epoch done
    lr: float = 0.0  # the current eps (after schedule drops and explicit overrides)
    elapsed_s: float = 0.0  # training time over every segment: max_minutes is a run total
    schedule: dict = field(default_factory=dict)  # the eps schedule's own state (optim.py)
    budget_drops: int = 0  # eps drops made by optim.budget_drops so far
    last_eval: dict = field(default_factory=dict)  # the latest validation evaluation
    best: dict = field(default_factory=dict)  # the best one: val errors, epoch, step (best.pt)
    status: str = "running"  # how the last segment ended: finished, max_steps, max_minutes, interrupted
    scaler: dict = field(default_factory=dict)  # fp16: the loss scaler's scale and growth tracker (scaler.py)

    def to_checkpoint(self) -> dict:
        """Checkpoint fields. step/epoch/batch/lr/schedule stay top-level keys (every checkpoint
        has them, and eval, ablate and report read them); the rest under "state"."""
        d = asdict(self)
        top = {k: d.pop(k) for k in ("step", "epoch", "batch", "lr", "schedule")}
        return {**top, "state": d}

    @classmethod
    def from_checkpoint(cls, ck: dict) -> "TrainState":
        st = dict(ck.get("state", {}))
        return cls(step=int(ck["step"]), epoch=int(ck["epoch"]), batch=int(ck["batch"]), lr=float(ck["lr"]),
                   schedule=dict(ck.get("schedule") or {}), elapsed_s=float(st.get("elapsed_s", 0.0)),
                   budget_drops=int(st.get("budget_drops", 0)),
                   last_eval=dict(st.get("last_eval", {})), best=dict(st.get("best", {})),
                   status=str(st.get("status", "running")), scaler=dict(st.get("scaler", {})))
