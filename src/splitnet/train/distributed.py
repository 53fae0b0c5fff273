"""Columns as torch.distributed ranks, and data-parallel replicas of the column model (a 2-D mesh).

World of R x C ranks for a layout of C columns: rank = replica * C + column. Each rank holds one
column's parameters (SplitAlexNet(local_columns=(column,))). Two kinds of process group:
  column group (size C): the ranks of one replica; the exchanges of §3.2 run here;
  data group   (size R): the ranks holding the same column; their gradients are averaged here.
Each replica trains on its slice of the global batch, so R replicas x batch B/R compute the gradient of
one process at batch B. gloo on the CPU, NCCL on GPUs; launched by torchrun (env:// rendezvous).

The exchange is an autograd function. Where every column reads a crossing layer (conv3, fc6, fc7 in
the paper), forward all-gathers every column's maps over the column group and concatenates them in
column order (what LocalExchange does with copies), and backward reduce-scatters the gradient of that
concatenation: each rank receives only its own slice, summed over every reader (an all-reduce of the
whole concatenation would send twice the bytes and throw away all but a slice). Where one column reads
(fc8 lives on the head column only), forward gathers to that rank and backward scatters the slices
back, so no rank receives maps it does not read. Either way each rank sends exactly the exchanges of
the layout's table (its forward maps, and the gradients of what it read), which `expected_traffic`
counts from the table and `traffic` from the collectives (bench/dist.py reports both). The collectives
need equal slices: a layout whose columns feed a crossing layer unequal widths is refused when the
model is built, naming the layer. The all-gather and reduce-scatter move one flat buffer each
(all_gather_into_tensor / reduce_scatter_tensor: the list forms copy every part once more), laid out
in the maps' own memory order, so channels_last maps stay channels_last (a .contiguous() would copy
them to NCHW and the next convolution back). A rank that does not read a crossing layer still takes part in its
collectives, and backpropagates a zero through its placeholder so that the backward collectives line
up on every rank.
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
# A failed run's diagnosis lives in failures.py; runtime.py and the tests reach it through this module.
from .failures import first_line, is_collective_failure, peer_failures, post_failure  # noqa: F401

log = logging.getLogger("splitnet")

_current_layer = [None]  # the crossing layer being exchanged (bench/dist.py times collectives per layer)
traffic: dict = {}  # bytes this rank sent, by kind ("exchange", "gradients"); reset by whoever reads it


def count_sent(kind: str, nbytes: float) -> None:
    traffic[kind] = traffic.get(kind, 0) + nbytes


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
    wait_group: object = None  # gloo, no practical timeout: the wait for rank 0's data preparation


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
    device = rank_device(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                         torch.cuda.device_count() if torch.cuda.is_available() else 0, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
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
    # Rank 0 may prepare a data set for hours while the others wait (start.build_run): that wait must not
    # fall under dist_timeout_s, which is meant for a rank that died or hangs in a step. torchrun
    # still stops the others if rank 0 fails.
    mesh.wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    if mesh.is_main:
        log.info("distributed: %d ranks = %d replica(s) x %d column(s), %s, backend %s", world, replicas,
                 columns, device, backend)
    return mesh


def rank_device(local_rank: int, local_world: int, gpus: int, backend: str | None = None) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK), or the CPU where the node has none. Ranks
    sharing a GPU are refused here, before any collective: NCCL rejects two ranks on one device
    (its error comes at the first collective and names neither the cause nor the fix)."""
    if gpus == 0 or backend == "gloo":
        return torch.device("cpu")
    if local_world > gpus:
        raise DistributedError(
            f"{local_world} ranks on this node but {gpus} GPU(s): NCCL cannot put two ranks on one GPU. "
            f"Run --nproc-per-node={gpus} or fewer, or one process with both columns on one GPU "
            f"(`splitnet train` without torchrun, devices unset), or the ranks on the CPU with gloo "
            f"(CUDA_VISIBLE_DEVICES= torchrun ...)")
    return torch.device("cuda", local_rank)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rows(x: torch.Tensor, cl: bool) -> torch.Tensor:
    """x [B, w, ...] as a contiguous tensor whose channel axis is the last (channels_last: [B, H, W, w],
    a view) or the second (NCHW, fc: x itself): the buffer a collective sends, in x's memory order."""
    return x.permute(0, 2, 3, 1) if cl else x.contiguous()


def _gather_columns(x: torch.Tensor, group, columns: int) -> torch.Tensor:
    """all-gather x [B, w, ...] -> [B, C w, ...] in column order, keeping x's memory format."""
    cl = _channels_last(x)
    flat = _rows(x, cl)
    buf = flat.new_empty((columns * flat.shape[0], *flat.shape[1:]))  # the ranks' buffers along dim 0
    dist.all_gather_into_tensor(buf, flat, group=group)
    ch = flat.dim() - 1 if cl else 1  # the channel axis of flat
    full = buf.view(columns, *flat.shape).movedim(0, ch).reshape(*flat.shape[:ch], columns * flat.shape[ch], *flat.shape[ch + 1:])
    return full.permute(0, 3, 1, 2) if cl else full


def _reduce_scatter_columns(grad: torch.Tensor, group, columns: int, cl: bool) -> torch.Tensor:
    """The backward of _gather_columns: grad [B, C w, ...] -> this column's [B, w, ...], summed over
    the ranks, in the memory format the forward's maps had."""
    g = grad.permute(0, 2, 3, 1) if cl else grad
    ch = g.dim() - 1 if cl else 1
    w = g.shape[ch] // columns
    parts = g.reshape(*g.shape[:ch], columns, w, *g.shape[ch + 1:]).movedim(ch, 0).contiguous()
    mine = parts.new_empty(parts.shape[1:])
    _reduce_scatter(mine, parts.view(-1, *parts.shape[2:]), group)  # rank r's part: rows r*B..(r+1)*B
    return mine.permute(0, 3, 1, 2) if cl else mine


# reduce_scatter_single where torch has it (reduce_scatter_tensor warns there), else the older name.
_reduce_scatter_fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    _reduce_scatter_fn(out, inp, group=group)


class _GatherColumns(torch.autograd.Function):
    """Every column reads. Forward: all-gather x [B, w, ...] over the column group, concatenated along
    dim 1 in column order -> [B, C w, ...]. Backward: reduce-scatter the gradient [B, C w, ...] -> this
    column's slice [B, w, ...], summed over the readers."""

    @staticmethod
    def forward(ctx, x, group, columns):
        ctx.group, ctx.columns, ctx.cl = group, columns, _channels_last(x)
        count_sent("exchange", (columns - 1) * _nbytes(x))
        return _gather_columns(x, group, columns)

    @staticmethod
    def backward(ctx, grad):
        mine = _reduce_scatter_columns(grad, ctx.group, ctx.columns, ctx.cl)
        count_sent("exchange", (ctx.columns - 1) * _nbytes(mine))
        return mine, None, None


class _GatherToReader(torch.autograd.Function):
    """One column (global rank `reader`) reads. Forward: gather x [B, w, ...] there -> [B, C w, ...]
    (elsewhere an empty placeholder). Backward: the reader scatters the gradient's slices back."""

    @staticmethod
    def forward(ctx, x, group, columns, reader):
        x = x.contiguous()
        # The slice's shape and type for backward: not x itself, which would keep it alive until then.
        ctx.group, ctx.columns, ctx.reader = group, columns, reader
        ctx.slice = (x.shape, dict(dtype=x.dtype, device=x.device))
        if dist.get_rank() == reader:
            parts = [torch.empty_like(x) for _ in range(columns)]
            dist.gather(x, parts, dst=reader, group=group)
            return torch.cat(parts, 1)
        dist.gather(x, None, dst=reader, group=group)
        count_sent("exchange", _nbytes(x))
        return x.new_zeros(0)

    @staticmethod
    def backward(ctx, grad):
        mine = torch.empty(ctx.slice[0], **ctx.slice[1])
        if dist.get_rank() == ctx.reader:
            slices = [g.contiguous() for g in grad.chunk(ctx.columns, dim=1)]
            dist.scatter(mine, slices, src=ctx.reader, group=ctx.group)
            count_sent("exchange", (ctx.columns - 1) * _nbytes(mine))
        else:
            dist.scatter(mine, None, src=ctx.reader, group=ctx.group)
        return mine, None, None, None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
        m = self.mesh
        if len(readers) == m.columns:
            full = _GatherColumns.apply(mine, m.column_group, m.columns)
        elif len(readers) == 1:
            full = _GatherToReader.apply(mine, m.column_group, m.columns, m.replica * m.columns + readers[0])
        else:
            raise DistributedError(f"layer {layer}: read by columns {list(readers)} of {m.columns}; the "
                                   f"distributed exchange supports one reader or all")
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
    check_equal_slices(model.layout)
    model.exchange = DistExchange(mesh)
    return model


def check_equal_slices(layout) -> None:
    """The collectives exchange equal slices: every column must feed each crossing layer (and each LRN
    across columns) maps of one shape. A DistributedError naming the layer otherwise, at build time."""
    stats = layout.stats()
    for i, row in enumerate(layout.rows):
        exchanged = [stats[i - 1].out_shapes] if row.cross and i else []  # the maps the layer reads
        if row.lrn and row.lrn_cross:
            exchanged.append([(w,) for w in row.widths])  # its own maps, for the LRN window
        for feeds in exchanged:
            if len(set(feeds)) > 1:
                shapes = ", ".join(f"column {c}: {s}" for c, s in enumerate(feeds))
                raise DistributedError(f"layer {row.name} of layout {layout.name!r}: the columns exchange maps "
                                       f"of different shapes ({shapes}); the distributed exchange needs columns "
                                       f"of equal width. Run this layout in one process (devices = [...])")


def expected_traffic(layout, replicas: int, column: int, rows: int) -> dict:
    """Bytes one rank of `column` sends per training step by the layout's table (fp32), with `rows`
    images per replica: the maps it sends forward and the gradients of the maps it read sent back (the
    table's exchanges from and to the column), and the ring all-reduce of its parameters' gradients
    over the replicas, 2 (R - 1) / R of their bytes."""
    per_image = sum(b for s in layout.stats() for src, dst, b in s.exchanges if column in (src, dst))
    params = sum(s.column_params[column] for s in layout.stats())
    return {"exchange": per_image * rows, "gradients": 2 * (replicas - 1) * 4 * params / replicas}


def backward(model, loss):
    """Backpropagate this rank's objective: the loss on the head column, the pending zero elsewhere."""
    obj = model.exchange.pending_objective()
    if loss is not None:
        obj = loss if obj is None else loss + obj
    if obj is not None:
        obj.backward()


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
