"""Columns as torch.distributed ranks, and data-parallel replicas of the column model (a 2-D mesh).

World of R x C ranks for a layout of C columns: rank = replica * C + column. Each rank holds one
column's parameters (SplitAlexNet(local_columns=(column,))). Two kinds of process group:
  column group (size C): the ranks of one replica; the exchanges of §3.2 run here;
  data group   (size R): the ranks holding the same column; their gradients are averaged here.
Each replica trains on its slice of the global batch, so R replicas x batch B/R compute the gradient of
one process at batch B. gloo on the CPU, NCCL on GPUs; launched by torchrun (env:// rendezvous).

The exchange is an autograd function: forward all-gathers every column's maps over the column group
and concatenates them in column order (what LocalExchange does with copies); backward all-reduces the
gradient of that concatenation over the group (the sum of what every reader sends back) and keeps this
column's slice. Tensors are made contiguous before each collective (the known pitfall of gathering
views). A rank that does not read a crossing layer (fc8 lives on the head column only) still takes
part in the collectives, and backpropagates a zero through its unused copy so that the backward
collectives line up on every rank.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import replace
from ..model.columns import SplitAlexNet
from ..model.convert import column_tensors
from ..model.exchange import ExchangeEvent, _record

log = logging.getLogger("splitnet")

_current_layer = [None]  # the crossing layer being exchanged (bench/dist.py times collectives per layer)


class DistributedError(RuntimeError):
    """A placement that cannot work, or a collective that failed (a rank died or hung)."""


@dataclass
class Mesh:
    """Where this process sits in the replicas x columns mesh."""

    rank: int
    world: int
    columns: int
    replicas: int
    column: int
    replica: int
    device: torch.device
    column_group: object = None
    data_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_mesh(columns: int, timeout_s: float = 300.0, backend: str | None = None) -> Mesh:
    """Join the process group torchrun set up (env://) and build the column and data groups.

    WORLD_SIZE must be a multiple of the layout's columns: 2 ranks = 1 replica x 2 columns,
    4 ranks = 2 x 2, 8 GPUs on one or several nodes = 4 x 2. `timeout_s` bounds every collective, so a
    rank that died or hangs stops the others with an error instead of a hang.
    """
    world = world_from_env()
    rank = int(os.environ.get("RANK", "0"))
    if world % columns:
        raise DistributedError(f"WORLD_SIZE={world} is not a multiple of the layout's {columns} columns: "
                               f"run {columns}, {2 * columns}, {3 * columns}, ... processes")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    replicas = world // columns
    mesh = Mesh(rank, world, columns, replicas, rank % columns, rank // columns, device)
    # Every rank must create every group, in the same order.
    for r in range(replicas):
        # Subgroups do not inherit the world's timeout (their default is 30 minutes): pass it on.
        g = dist.new_group([r * columns + c for c in range(columns)], timeout=timeout)
        if r == mesh.replica:
            mesh.column_group = g
    for c in range(columns):
        g = dist.new_group([r * columns + c for r in range(replicas)], timeout=timeout)
        if c == mesh.column:
            mesh.data_group = g
    if mesh.is_main:
        log.info("distributed: %d ranks = %d replica(s) x %d column(s), %s, backend %s", world, replicas,
                 columns, device, backend)
    return mesh


class _GatherColumns(torch.autograd.Function):
    """Forward: all-gather x over the column group, concatenate along dim 1 in column order.
    Backward: all-reduce the gradient over the group, return this column's slice."""

    @staticmethod
    def forward(ctx, x, group, columns, index):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(columns)]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.index, ctx.width = group, index, x.shape[1]
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(1, ctx.index * ctx.width, ctx.width).contiguous(), None, None, None


class DistExchange:
    """The exchange interface of exchange.LocalExchange, across processes (one column per rank)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.unused = []  # gathered inputs this rank does not read (kept for the backward collectives)

    def gather(self, layer: str, outs, readers) -> list:
        c = self.mesh.column
        mine = outs[c]
        if mine is None:
            raise DistributedError(f"layer {layer}: column {c} has no output to exchange; the distributed "
                                   f"placement needs every column to feed every crossing layer")
        for d in readers:
            if d != c:
                _record(ExchangeEvent(layer, c, d, mine.numel() * mine.element_size(), tuple(mine.shape)))
        _current_layer[0] = layer
        full = _GatherColumns.apply(mine, self.mesh.column_group, self.mesh.columns, c)
        res = [None] * len(outs)
        if c in readers:
            res[c] = full
        elif full.requires_grad:
            self.unused.append(full)
        return res

    def pending_objective(self):
        """A zero that depends on every gathered-but-unread tensor: backpropagating it runs this rank's
        share of the backward collectives (the gradients it must send to the readers)."""
        total = None
        for t in self.unused:
            z = (t * 0).sum()
            total = z if total is None else total + z
        self.unused = []
        return total


def build_model(cfg, num_classes: int, mesh: Mesh):
    """This rank's SplitAlexNet: the full network initialised as in one process, then only its column kept."""
    mcfg = replace(cfg.model, num_classes=num_classes)
    model = SplitAlexNet(config=mcfg, devices=(mesh.device,) * mesh.columns, local_columns=(mesh.column,))
    if model.layout.columns != mesh.columns:
        raise DistributedError(f"layout {model.layout.name!r} has {model.layout.columns} columns, the mesh "
                               f"{mesh.columns}")
    model.exchange = DistExchange(mesh)
    return model


def backward(model, loss):
    """Backpropagate this rank's objective: the loss on the head column, the pending zero elsewhere."""
    obj = model.exchange.pending_objective()
    if loss is not None:
        obj = loss if obj is None else loss + obj
    if obj is not None:
        obj.backward()


def average_gradients(model, mesh: Mesh) -> None:
    """Mean of each column's parameter gradients over the replicas of that column (one flat all-reduce)."""
    if mesh.replicas == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=mesh.data_group)
    flat /= mesh.replicas
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


def reduce_scalars(values, mesh: Mesh, op=dist.ReduceOp.SUM) -> list:
    """All-reduce a few floats over the whole world (loss, errors, stop flags)."""
    t = torch.tensor(values, dtype=torch.float64, device=mesh.device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def gather_columns(model, optimizer, mesh: Mesh):
    """On rank 0: (per-column weights, per-column velocities) of replica 0, for a grouped checkpoint.
    Other ranks return (None, None). Collective over replica 0's column group."""
    if mesh.replica != 0:
        return None, None
    c = mesh.column

    def velocity(p):
        st = optimizer.state.get(p, {})
        return st["velocity"] if "velocity" in st else torch.zeros_like(p)

    mine = (column_tensors(model, lambda p: p)[c], column_tensors(model, velocity)[c])
    got = [None] * mesh.columns if mesh.rank == 0 else None
    dist.gather_object(mine, got, dst=0, group=mesh.column_group)
    if mesh.rank != 0:
        return None, None
    return [g[0] for g in got], [g[1] for g in got]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
