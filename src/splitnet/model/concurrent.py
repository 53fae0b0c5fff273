"""Where each column's work runs inside one process (§3.2: the two GPUs work in parallel and
"communicate only in certain layers").

A forward pass is a chain of *segments*: the rows between two exchanges (paper layout:
[conv1, conv2] | [conv3, conv4, conv5] | [fc6] | [fc7] | [fc8]). Inside a segment the columns are
independent, so they can run at the same time. There is one walk over the segments,
SplitAlexNet.walk (columns.py); it calls the exchange (exchange.py) between segments and hands each
segment to an *executor* from this module, which only decides where each column's rows run. The
executors, by SplitAlexNet(concurrency=...):

  "sequential"  `Sequential`: the columns' work is issued one column after the other from the Python
                thread. On two GPUs this already overlaps: kernel launches return at once and each
                GPU runs its own queue.
  "threads"     `Threads`, CPU emulation: one worker thread per column, torch's intra-op threads
                divided among them (2 cores: one each), forward *and* backward of each segment in
                the column's thread. The autograd engine runs all CPU backward work in the thread
                that called backward(), so the whole walk is wrapped in one autograd Function whose
                backward replays the segments in reverse, again one thread per column, and routes
                the gradients across each exchange with exchange.py's gather_backward. Module hooks
                run in the column's thread, at the same time as the other column's: a hook that
                updates shared state must be thread-safe (append to a list, or take a lock).
  "streams"     `Streams`, both columns on one GPU: each column's kernels queue on its own CUDA
                stream, the exchanges are cross-stream waits (events); backward kernels run on the
                stream of their forward op (PyTorch's rule), so they overlap too.
  "auto"        what `bench` measured fastest for the placement (see `choose`), or, once
                tune.calibrate has timed the candidates on the model's own placement, the fastest.

Every strategy computes the same network (tests hold them equal to the sequential one and to the
independent grouped reference).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import bf16emu
from .exchange import broadcast_backward

STRATEGIES = ("auto", "sequential", "threads", "streams")


def segments(layout) -> list:
    """The rows of `layout` cut before every crossing row: lists of LayerRow, in order."""
    return [stage.rows for stage in stages(layout, lrn_across=False)]


@dataclass(frozen=True)
class Stage:
    """One step of the walk: an optional exchange, then every column's part of some rows.

    exchange: the row whose inputs are gathered from every column before this stage (None: each
    column reads its own previous output). steps: ((row, part), ...), part "layer" (the whole row),
    or "pre" / "post" around the exchange inside a row whose LRN spans the columns (lrn_scope="all":
    the layer and ReLU, then LRN over the gathered maps, pooling, dropout; only "sequential" runs it).
    """
    index: int
    exchange: object
    steps: tuple

    @property
    def rows(self) -> list:
        return [row for row, _ in self.steps]


def stages(layout, lrn_across: bool = True, upto: str | None = None) -> list:
    """The segments of `layout` as Stages, ending after row `upto` (default: the last). lrn_across:
    LRN is on, so a row with lrn_cross exchanges inside itself (cut between its "pre" and "post")."""
    plan = []  # [exchange row or None, steps]
    for row in layout.rows:
        if row.cross or not plan:
            plan.append([row if row.cross else None, []])
        if lrn_across and row.lrn and row.lrn_cross:
            plan[-1][1].append((row, "pre"))
            plan.append([row, [(row, "post")]])
        else:
            plan[-1][1].append((row, "layer"))
        if row.name == upto:
            break
    return [Stage(k, ex, tuple(steps)) for k, (ex, steps) in enumerate(plan)]


def unsupported(model, strategy: str) -> str | None:
    """Why `strategy` cannot run `model` (None when it can)."""
    devs = model.devices
    if strategy == "sequential":
        return None
    if len(model.local) != model.layout.columns:
        return "the model holds only some columns (torchrun: one column per rank)"
    for row in model.layout.rows:
        if row.lrn and row.lrn_cross and model.config.lrn:
            return f"layer {row.name}: LRN across columns (lrn_scope='all') is an exchange inside a layer"
    if strategy == "threads":
        if any(d.type != "cpu" for d in devs):
            return "'threads' is the CPU emulation's strategy (columns on GPUs run concurrently as they are)"
    elif strategy == "streams":
        if any(d.type != "cuda" for d in devs) or len(set(devs)) != 1:
            return "'streams' needs every column on the same CUDA device"
    else:
        raise ValueError(f"concurrency: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    return None


def choose(model, requested: str) -> str:
    """The strategy a model runs with; "auto" is what `make bench` measured fastest for the placement.

    CPU emulation, 2 cores, batch 128 (README, Performance): threads train from 4% faster (3.66 vs
    3.79 s per step) to 1% slower (3.87 vs 3.85 s) than sequential, run to run, and infer as fast,
    so auto is threads when there are at least as many intra-op threads as columns (one core each);
    else sequential. GPUs: sequential (on two GPUs it already overlaps: launches are asynchronous)
    until tune.calibrate has timed the candidates on the model's placement (training does so on a
    GPU: sequential against streams on one GPU); then auto is the faster.
    """
    if requested not in STRATEGIES:
        raise ValueError(f"concurrency: {requested!r} is not one of {', '.join(STRATEGIES)}")
    if requested != "auto":
        why = unsupported(model, requested)
        if why:
            raise ValueError(f"concurrency={requested!r}: {why}")
        return requested
    tuned = getattr(model, "tuned_strategy", None)
    if tuned is not None and unsupported(model, tuned) is None:
        return tuned  # measured on this model's placement (tune.py)
    return _rule(model)


def _rule(model) -> str:
    if unsupported(model, "threads") is None and torch.get_num_threads() >= model.layout.columns:
        return "threads"
    return "sequential"


def candidates(model) -> list:
    """The strategies that can run `model` where it is placed, the rule's choice first: what
    tune.calibrate times to settle "auto"."""
    first = _rule(model)
    return [first] + [s for s in STRATEGIES[1:] if s not in (first, "threads") and unsupported(model, s) is None]


# ---- executors -------------------------------------------------------------------------------
# The walk (SplitAlexNet.walk) calls, in order: begin(model, image copies) once; per stage, exchange
# (when the stage starts with one) and run; end(outputs) once. Each returns the per-column list the
# walk carries on (None where a column has no tensor). jobs: [(column, input)] of the columns that
# compute the stage, in column order.


def _column(model, c: int, steps, h):
    """Column c's part of one stage, as a profiler range (bench.model.column_overlap reads them)."""
    with torch.profiler.record_function(f"splitnet.column{c}"):
        return model.columns[c].run(steps, h)


class Sequential:
    """Every column's work issued in column order from the calling thread."""

    def begin(self, model, xs: list) -> list:
        return xs

    def exchange(self, gather, readers: list) -> list:
        """gather(readers): the exchange's per-column inputs (exchange.LocalExchange.gather)."""
        return gather(readers)

    def run(self, model, stage: Stage, jobs: list) -> list:
        outs = [None] * model.layout.columns
        for c, h in jobs:
            outs[c] = model.columns[c].run(stage.steps, h)
        return outs

    def end(self, outs: list) -> list:
        return outs


# ---- threads (CPU) ---------------------------------------------------------------------------
_pools: dict = {}
_pools_lock = threading.Lock()
_tls = threading.local()


def _pool(n: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="splitnet-column")
        return _pools[n]


def _in_thread(fn, threads: int, grad: bool, autocast, emulated: bool):
    """fn run in a worker with `threads` intra-op threads and the caller's grad / autocast mode and
    bf16 emulation (all thread-local in PyTorch)."""
    def run(*args):
        if getattr(_tls, "threads", None) != threads:
            torch.set_num_threads(threads)
            _tls.threads = threads
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]), \
                bf16emu.emulating(emulated):
            return fn(*args)
    return run


def _parallel(fn, jobs: list, inline: bool = False) -> list:
    """[fn(*job) for job in jobs], one worker thread per job (inline in this thread when there is one
    job, or when `inline`: then the job keeps all of this thread's intra-op threads and the order of
    the global RNG's draws is the sequential one)."""
    if inline or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    threads = max(1, torch.get_num_threads() // len(jobs))
    ac = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    run = _in_thread(fn, threads, torch.is_grad_enabled(), ac, bf16emu.active())
    futures = [_pool(len(jobs)).submit(run, *job) for job in jobs]
    return [f.result() for f in futures]


def _needs_global_rng(model, rows) -> bool:
    """Dropout drawing from the global RNG: run the columns in order, as sequential mode does, so a
    seed gives the same masks whatever the strategy."""
    return any(r.dropout for r in rows) and model.training and model.config.dropout > 0 and any(
        col.dropout_stream is None for col in model.columns)


class Threads(Sequential):
    """One worker thread per column (CPU emulation). With tape=True (training, inside
    _ThreadedColumns) every stage's input is cut off the graph as a leaf, so `backward` can run each
    stage's backward on its own, again one thread per column. x_grad: the image's gradient is wanted."""

    def __init__(self, tape: bool = False, x_grad: bool = False):
        self.tape, self.x_grad = tape, x_grad
        self.prev = None  # the outputs this executor last handed the walk: what an exchange reads
        self.records = []  # per stage: (stage, prev, leaves, outs), for backward

    def begin(self, model, xs: list) -> list:
        self.prev = xs
        return xs

    def run(self, model, stage: Stage, jobs: list) -> list:
        leaf_grad = stage.index > 0 or self.x_grad  # the image's copies need a gradient only if x does

        def one(c, h):
            if self.tape:
                h = h.detach().requires_grad_(leaf_grad)
            return h, _column(model, c, stage.steps, h)

        res = _parallel(one, jobs, inline=_needs_global_rng(model, stage.rows))
        n = model.layout.columns
        leaves, outs = [None] * n, [None] * n
        for (c, _), (leaf, out) in zip(jobs, res):
            leaves[c], outs[c] = leaf, out
        if self.tape:
            # The next stage reads this one's outputs cut from the graph; backward chains them.
            self.records.append((stage, self.prev, leaves, outs))
            outs = [None if o is None else o.detach() for o in outs]
        self.prev = outs
        return outs

    def backward(self, model, grad, params, x_device):
        """Gradients of the image and of `params` from the head's output gradient `grad`: the stages
        in reverse, one thread per column; across each exchange, exchange.py routes them."""
        n = model.layout.columns
        index = {id(p): i for i, p in enumerate(params)}
        pgrads = [None] * len(params)
        gout = [None] * n
        gout[model.layout.head] = grad
        for stage, prev, leaves, outs in reversed(self.records):
            jobs = [(c, leaves[c], outs[c], gout[c]) for c in range(n)
                    if outs[c] is not None and gout[c] is not None and outs[c].requires_grad]
            res = _parallel(_column_backward(model, stage), jobs)
            gin = [None] * n
            for (c, *_), (g_leaf, g_params) in zip(jobs, res):
                gin[c] = g_leaf
                for p, g in g_params:
                    pgrads[index[id(p)]] = g
            gout = model.exchange.gather_backward(prev, gin) if stage.exchange is not None else gin
            leaves[:] = outs[:] = [None] * n  # free the stage's graph as soon as it is done
        self.records = []
        return broadcast_backward(gout, x_device), pgrads


def _column_backward(model, stage: Stage):
    def run(c, leaf, out, g):
        col = model.columns[c]
        params = [p for row in stage.rows if row.widths[c] > 0 for p in getattr(col, row.name).parameters()
                  if p.requires_grad]
        inputs = ([leaf] if leaf.requires_grad else []) + params
        with torch.profiler.record_function(f"splitnet.column{c}.backward"):
            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
        g_leaf = grads[0] if leaf.requires_grad else None
        return g_leaf, list(zip(params, grads[1 if leaf.requires_grad else 0:]))
    return run


class _ThreadedColumns(torch.autograd.Function):
    """The whole walk as one autograd node: forward and backward run stage by stage with one thread
    per column (Threads). Parameter gradients are returned (not accumulated on the side), so
    .backward(), torch.autograd.grad and gradient hooks see them as usual."""

    @staticmethod
    def forward(ctx, model, x, *params):
        executor = Threads(tape=True, x_grad=ctx.needs_input_grad[1])
        with torch.enable_grad():
            out = model.walk(x, executor)[model.layout.head]
        ctx.model, ctx.executor, ctx.params, ctx.x_device = model, executor, params, x.device
        return out

    @staticmethod
    def backward(ctx, grad):
        gx, pgrads = ctx.executor.backward(ctx.model, grad, ctx.params, ctx.x_device)
        ctx.executor = None
        return (None, gx, *pgrads)


def threads_forward(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model` on padded input x, columns in worker threads (see the module docstring)."""
    params = list(model.columns.parameters())
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _ThreadedColumns.apply(model, x, *params)
    return model.walk(x, Threads())[model.layout.head]


# ---- streams (one GPU) -------------------------------------------------------------------------
_streams: dict = {}


def reset_streams() -> None:
    """Forget the column streams made so far: the next streams run makes new ones (and with them new
    pools of the caching allocator, which keeps one per stream; bench/gpu_check.py)."""
    _streams.clear()


def _column_streams(device: torch.device, n: int) -> list:
    key = (device, n)
    if key not in _streams:
        _streams[key] = [torch.cuda.Stream(device) for _ in range(n)]
    return _streams[key]


class Streams(Sequential):
    """Each column's kernels on its own CUDA stream of the one GPU. Autograd records the streams;
    backward kernels run on the stream of their forward op and it inserts the waits where a
    gradient crosses streams, so backward overlaps as forward does.

    main / streams: the caller's stream and one per column (default: the device's current stream
    and this module's cached ones); a test substitutes stand-ins to follow the waits on the CPU."""

    def __init__(self, model, main=None, streams=None):
        dev = model.devices[0]
        self.main = torch.cuda.current_stream(dev) if main is None else main
        self.streams = _column_streams(dev, model.layout.columns) if streams is None else streams
        self.prev = None

    # The three stream operations, apart so a test can stand in for them.
    @staticmethod
    def on(stream):
        return torch.cuda.stream(stream)

    @staticmethod
    def keep(t: torch.Tensor, stream) -> None:
        t.record_stream(stream)  # t is read on `stream`: keep the allocator from reusing it too early

    def begin(self, model, xs: list) -> list:
        for s, x in zip(self.streams, xs):
            s.wait_stream(self.main)  # the input was produced on the caller's stream
            self.keep(x, s)
        self.prev = xs
        return xs

    def exchange(self, gather, readers: list) -> list:
        # Every reader first waits for every other column's stream (all waits before any copy, so no
        # reader waits for another's concatenation), then gathers on its own stream.
        for c in readers:
            for s, t in enumerate(self.prev):
                if t is not None and s != c:
                    self.streams[c].wait_stream(self.streams[s])
                    self.keep(t, self.streams[c])
        ins = [None] * len(self.prev)
        for c in readers:
            with self.on(self.streams[c]):
                ins[c] = gather([c])[c]
        return ins

    def run(self, model, stage: Stage, jobs: list) -> list:
        outs = [None] * model.layout.columns
        for c, h in jobs:
            with self.on(self.streams[c]):
                outs[c] = _column(model, c, stage.steps, h)
        self.prev = outs
        return outs

    def end(self, outs: list) -> list:
        for c, t in enumerate(outs):
            if t is not None:
                self.main.wait_stream(self.streams[c])
                self.keep(t, self.main)
        return outs


def streams_forward(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model` on padded input x, each column on its own CUDA stream (Streams)."""
    return model.walk(x, Streams(model))[model.layout.head]


__all__ = ["STRATEGIES", "segments", "stages", "Stage", "choose", "candidates", "unsupported",
           "Sequential", "Threads", "Streams", "threads_forward", "streams_forward"]
