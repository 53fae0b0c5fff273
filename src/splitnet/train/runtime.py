"""What a training step needs to know about its placement: one process, or a torchrun mesh.

loop.py talks to one of these and never to torch.distributed directly:
  LocalRuntime  one process, columns on its devices (CPU emulation, one GPU, several GPUs);
  DistRuntime   one column per rank, replicas x columns (distributed.py), launched by torchrun.
"""
from __future__ import annotations

import torch

from ..config import replace
from ..model.columns import SplitAlexNet, model_layout
from ..model.convert import grouped_from_columns
from . import checkpoint as ckpt
from . import distributed as D
from .distributed import world_from_env


class LocalRuntime:
    mesh = None
    is_main = True
    rank = 0

    def build_model(self, cfg, num_classes: int):
        return SplitAlexNet(config=replace(cfg.model, num_classes=num_classes), devices=tuple(cfg.devices) or None,
                            concurrency=cfg.concurrency)

    def share(self, x, y):
        """This process's rows of the global batch: (x, y, offset)."""
        return x, y, 0

    def backward(self, model, loss) -> None:
        loss.backward()

    def sync_grads(self, model) -> None:
        pass

    def agree(self, loss: float, err: float, signalled: bool, elapsed_s: float) -> tuple:
        """(global loss, global train error, whether a stop signal came, the run's elapsed time), the
        same on every process: budget decisions made from them agree across ranks."""
        return loss, err, signalled, elapsed_s

    def eval_result(self, errs: dict | None) -> dict:
        return errs

    def checkpoint_tensors(self, model, optimizer):
        """(grouped weights, grouped velocities) on the main process, (None, None) elsewhere."""
        payload = ckpt.model_payload(model, optimizer)
        return payload["model"], payload["velocity"]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DistRuntime(LocalRuntime):
    def __init__(self, columns: int, timeout_s: float):
        self.D = D
        self.mesh = D.init_mesh(columns, timeout_s)
        self.is_main = self.mesh.is_main
        self.rank = self.mesh.rank

    def build_model(self, cfg, num_classes: int):
        if cfg.devices:
            raise self.D.DistributedError("devices: under torchrun each rank uses its own device "
                                          "(LOCAL_RANK's GPU, or the CPU); leave devices unset")
        return self.D.build_model(cfg, num_classes, self.mesh)

    def share(self, x, y):
        m = self.mesh
        if len(x) % m.replicas:
            raise self.D.DistributedError(f"batch_size {len(x)} is not divisible by the {m.replicas} replicas")
        b = len(x) // m.replicas
        off = m.replica * b
        return x[off:off + b], y[off:off + b], off

    def backward(self, model, loss) -> None:
        self.D.backward(model, loss)

    def sync_grads(self, model) -> None:
        self.D.average_gradients(model, self.mesh)

    def agree(self, loss, err, signalled, elapsed_s):
        # Only the head column of each replica has a loss: sum them and divide by the replicas.
        # One collective per step also carries the stop flag and the clocks (their mean), so all
        # ranks stop, and drop eps on a time budget, at the same step.
        m = self.mesh
        total_loss, total_err, sig, clock = self.D.reduce_scalars(
            [0.0 if loss is None else loss, 0.0 if err is None else err, float(signalled), float(elapsed_s)], m)
        return total_loss / m.replicas, total_err / m.replicas, sig > 0, clock / m.world

    def eval_result(self, errs):
        # Every replica evaluates the whole validation set; replica 0's head column reports.
        first = errs is not None and self.mesh.replica == 0
        keys = ("val_top1_err", "val_top5_err")
        vals = self.D.reduce_scalars([errs[k] if first else 0.0 for k in keys], self.mesh)
        return dict(zip(keys, vals))

    def checkpoint_tensors(self, model, optimizer):
        weights, velocities = self.D.gather_columns(model, optimizer, self.mesh)
        if weights is None:
            return None, None
        return grouped_from_columns(model.layout, weights), grouped_from_columns(model.layout, velocities)

    def barrier(self) -> None:
        torch.distributed.barrier()

    def close(self) -> None:
        self.D.shutdown()


def make_runtime(cfg):
    if world_from_env() > 1:
        return DistRuntime(model_layout(cfg.model.layout, cfg.model).columns, cfg.dist_timeout_s)
    return LocalRuntime()


__all__ = ["LocalRuntime", "DistRuntime", "make_runtime"]
