"""What a training step needs to know about its placement: one process, or a torchrun mesh.

The training (loop.py, start.py, epochs.py) talks to one of these and never to torch.distributed directly:
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
from .evaluate import error_rates
from .grad_sync import make_reducer


class LocalRuntime:
    mesh = None
    is_main = True
    rank = 0

    def build_model(self, cfg, num_classes: int):
        return SplitAlexNet(config=replace(cfg.model, num_classes=num_classes), devices=tuple(cfg.devices) or None,
                            concurrency=cfg.concurrency)

    def share(self, batch_size: int) -> tuple:
        """(offset, rows): the rows of each global batch this process loads and trains on."""
        return 0, batch_size

    def eval_rows(self, n: int) -> tuple:
        """(lo, hi): the validation images (of the first n) this process evaluates."""
        return 0, n

    def backward(self, model, loss) -> None:
        loss.backward()

    def sync_grads(self, model) -> None:
        pass

    def agree(self, loss: float, err: float, signalled: bool, elapsed_s: float, overflow: bool = False) -> tuple:
        """(global loss, global train error, whether a stop signal came, the run's elapsed time,
        whether any process's gradients overflowed (fp16: train/scaler.py)), the same on every
        process: budget and skip decisions made from them agree across ranks. One process returns
        loss and err as given (device tensors, read later: train/step.py)."""
        return loss, err, signalled, elapsed_s, overflow

    def eval_result(self, misses: dict, n: int) -> dict:
        """{val_top1_err, val_top5_err} from this process's miss counts (evaluate.topk_misses) over n images."""
        return error_rates(misses, n, "val_")

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
        self.reducer = None
        self.mesh = D.init_mesh(columns, timeout_s)
        self.is_main = self.mesh.is_main
        self.rank = self.mesh.rank

    def build_model(self, cfg, num_classes: int):
        if cfg.devices:
            raise self.D.DistributedError("devices: under torchrun each rank uses its own device "
                                          "(LOCAL_RANK's GPU, or the CPU); leave devices unset")
        model = self.D.build_model(cfg, num_classes, self.mesh)
        # Gradient hooks launch the replicas' all-reduces while backward runs (grad_sync.py).
        self.reducer = make_reducer(model.parameters(), self.mesh.data_group, self.mesh.replicas,
                                    cfg.dist_bucket_mb, self.D.count_sent)
        return model

    def share(self, batch_size: int) -> tuple:
        # Each replica loads and augments only its rows: R replicas x B/R rows are one process's batch B.
        m = self.mesh
        if batch_size % m.replicas:
            raise self.D.DistributedError(f"batch_size {batch_size} is not divisible by the {m.replicas} replicas")
        b = batch_size // m.replicas
        return m.replica * b, b

    def eval_rows(self, n: int) -> tuple:
        # Contiguous shards, one per replica (every column of a replica evaluates the same shard).
        m = self.mesh
        return n * m.replica // m.replicas, n * (m.replica + 1) // m.replicas

    def backward(self, model, loss) -> None:
        self.D.backward(model, loss)

    def sync_grads(self, model) -> None:
        if self.reducer is not None:
            self.reducer.finish()

    def agree(self, loss, err, signalled, elapsed_s, overflow=False):
        # Only the head column of each replica has a loss: sum them and divide by the replicas.
        # One collective per step also carries the stop flag, the clocks (their mean) and the fp16
        # overflow flags (each rank checks its own column's gradients), so all ranks stop, drop eps
        # on a time budget, and skip an overflowing step, at the same step.
        # loss and err may be device tensors (train/step.py): the collective reads them anyway.
        m = self.mesh
        total_loss, total_err, sig, clock, inf = self.D.reduce_scalars(
            [0.0 if loss is None else float(loss), 0.0 if err is None else float(err), float(signalled),
             float(elapsed_s), float(overflow)], m)
        return total_loss / m.replicas, total_err / m.replicas, sig > 0, clock / m.world, inf > 0

    def eval_result(self, misses, n):
        # The head column of each replica holds its shard's miss counts (other ranks None): their sum
        # over the world is the whole set's count, exact in float64.
        ks = (1, 5)
        total = self.D.reduce_scalars([misses[k] if misses else 0 for k in ks], self.mesh)
        return error_rates(dict(zip(ks, total)), n, "val_")

    def checkpoint_tensors(self, model, optimizer):
        weights, velocities = self.D.gather_columns(model, optimizer, self.mesh)
        if weights is None:
            return None, None
        return grouped_from_columns(model.layout, weights), grouped_from_columns(model.layout, velocities)

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.mesh.wait_group)  # outlasts dist_timeout_s (init_mesh)

    def failure(self, e: BaseException, run_dir, timeout_s: float) -> BaseException:
        """What this rank raises for `e`. Its own error (out of memory, a shape bug, a missing file) is
        raised as it is, traceback and all, with a note naming the rank, and left in the store for the
        others. A collective that failed because of another rank names that rank and its error when it
        left one, else says a rank died or hung; both keep the last checkpoint."""
        m, D = self.mesh, self.D
        where = f"rank {m.rank} (replica {m.replica}, column {m.column})"
        if not D.is_collective_failure(e):
            D.post_failure(m, e)
            e.add_note(f"splitnet: {where} failed here; the other ranks stop and name this rank. The last "
                       f"complete checkpoint in {run_dir} is kept: resume with splitnet train --resume {run_dir}")
            return e
        peers = D.peer_failures(m)
        cause = ("; ".join(f"rank {r} failed first: {msg} (its traceback is in rank {r}'s output)"
                           for r, msg in sorted(peers.items())) if peers else
                 f"another rank died or hung for more than dist_timeout_s={timeout_s:g}s")
        return D.DistributedError(f"{where}: a collective failed ({D.first_line(e)}); {cause}. The last complete "
                                  f"checkpoint in {run_dir} is kept: resume with splitnet train --resume {run_dir}")

    def close(self) -> None:
        self.D.shutdown()


def make_runtime(cfg):
    if world_from_env() > 1:
        return DistRuntime(model_layout(cfg.model.layout, cfg.model).columns, cfg.dist_timeout_s)
    return LocalRuntime()


__all__ = ["LocalRuntime", "DistRuntime", "make_runtime"]
