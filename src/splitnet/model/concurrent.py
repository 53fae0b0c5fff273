"""Running the columns concurrently inside one process (§3.2: the two GPUs work in parallel and
"communicate only in certain layers").

A forward pass is a chain of *segments*: the rows between two exchanges (paper layout:
[conv1, conv2] | [conv3, conv4, conv5] | [fc6] | [fc7] | [fc8]). Inside a segment the columns are
independent, so they can run at the same time. How, depends on where they sit
(SplitAlexNet(concurrency=...)):

  "sequential"  the columns' work is issued one column after the other from the Python thread. On
                two GPUs this already overlaps: kernel launches return at once and each GPU runs its
                own queue (columns.py).
  "threads"     CPU emulation: one worker thread per column, torch's intra-op threads divided
                among them (2 cores: one each), forward *and* backward of each segment in the column's
                thread. The autograd engine runs all CPU backward work in the thread that called
                backward(), so the whole net is wrapped in one autograd Function whose backward
                replays the segments in reverse, again one thread per column. Module hooks run
                in the column's thread, at the same time as the other column's: a hook that
                updates shared state must be thread-safe (append to a list, or take a lock).
  "streams"     both columns on one GPU: each column's kernels queue on its own CUDA stream, the
                exchanges are cross-stream waits (events); backward kernels run on the stream of
                their forward op (PyTorch's rule), so they overlap too.
  "auto"        what `bench` measured fastest for the placement (see `choose`), or, once
                tune.calibrate has timed the candidates on the model's own placement, the fastest.

Every strategy computes the same network (tests hold them equal to the sequential one and to the
independent grouped reference).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

STRATEGIES = ("auto", "sequential", "threads", "streams")


def segments(layout) -> list:
    """The rows of `layout` cut before every crossing row: lists of LayerRow, in order."""
    segs = []
    for row in layout.rows:
        if row.cross or not segs:
            segs.append([])
        segs[-1].append(row)
    return segs


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


# ---- threads (CPU) ---------------------------------------------------------------------------
_pools: dict = {}
_pools_lock = threading.Lock()
_tls = threading.local()


def _pool(n: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="splitnet-column")
        return _pools[n]


def _in_thread(fn, threads: int, grad: bool, autocast):
    """fn run in a worker with `threads` intra-op threads and the caller's grad / autocast mode
    (both are thread-local in PyTorch)."""
    def run(*args):
        if getattr(_tls, "threads", None) != threads:
            torch.set_num_threads(threads)
            _tls.threads = threads
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
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
    run = _in_thread(fn, threads, torch.is_grad_enabled(), ac)
    futures = [_pool(len(jobs)).submit(run, *job) for job in jobs]
    return [f.result() for f in futures]


def _needs_global_rng(model, seg) -> bool:
    """Dropout drawing from the global RNG: run the columns in order, as sequential mode does, so a
    seed gives the same masks whatever the strategy."""
    return any(r.dropout for r in seg) and model.training and model.config.dropout > 0 and any(
        col.dropout_stream is None for col in model.columns)


def _run_column(model, c: int, rows, h, leaf: bool, leaf_grad: bool = True):
    """Column c's rows of one segment on input h. With leaf=True (training) h is cut off the graph
    and made a leaf (requiring grad when leaf_grad: not for the image unless its gradient is
    wanted), so this segment's backward can run on its own: returns (leaf, output)."""
    if leaf:
        h = h.detach().requires_grad_(leaf_grad)
    inp = h
    col = model.columns[c]
    with torch.profiler.record_function(f"splitnet.column{c}"):
        for row in rows:
            h = col.layer(row, h) if row.widths[c] > 0 else None
            if h is None:
                break
    return inp, h


def _segment_inputs(model, seg, prev: list) -> list:
    row = seg[0]
    if not row.cross:
        return list(prev)
    readers = [c for c, w in enumerate(row.widths) if w > 0]
    return model.exchange.gather(row.name, prev, readers)


def threads_forward(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model` on padded input x, columns in worker threads (see the module docstring)."""
    params = list(model.columns.parameters())
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _ThreadedColumns.apply(model, x, *params)
    out, _ = _forward(model, x, tape=False)
    return out


def _forward(model, x, tape: bool, x_grad: bool = False):
    n = model.layout.columns
    prev = [x.to(d, non_blocking=True) for d in model.devices]
    records = []
    for k, seg in enumerate(segments(model.layout)):
        ins = _segment_inputs(model, seg, prev)
        jobs = [(model, c, seg, ins[c], tape, k > 0 or x_grad) for c in range(n)
                if ins[c] is not None and seg[0].widths[c] > 0]
        res = _parallel(_run_column, jobs, inline=_needs_global_rng(model, seg))
        outs = [None] * n
        leaves = [None] * n
        for job, (leaf, out) in zip(jobs, res):
            leaves[job[1]], outs[job[1]] = leaf, out
        # The next segment's inputs are this one's outputs cut from the graph (backward chains them).
        records.append((seg, prev, leaves, outs))
        prev = [None if o is None else (o.detach() if tape else o) for o in outs]
    return prev[model.layout.head], records


class _ThreadedColumns(torch.autograd.Function):
    """The whole split net as one autograd node: forward and backward run segment by segment with
    one thread per column. Parameter gradients are returned (not accumulated on the side), so
    .backward(), torch.autograd.grad and gradient hooks see them as usual."""

    @staticmethod
    def forward(ctx, model, x, *params):
        with torch.enable_grad():
            out, records = _forward(model, x, tape=True, x_grad=ctx.needs_input_grad[1])
        ctx.model, ctx.records, ctx.params = model, records, params
        ctx.x_device = x.device
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        model, n = ctx.model, ctx.model.layout.columns
        index = {id(p): i for i, p in enumerate(ctx.params)}
        pgrads = [None] * len(ctx.params)
        gout = [None] * n
        gout[model.layout.head] = grad
        for seg, prev, leaves, outs in reversed(ctx.records):
            jobs = [(c, leaves[c], outs[c], gout[c]) for c in range(n)
                    if outs[c] is not None and gout[c] is not None and outs[c].requires_grad]
            res = _parallel(_column_backward(model, seg), jobs)
            gin = [None] * n
            for (c, *_), (g_leaf, g_params) in zip(jobs, res):
                gin[c] = g_leaf
                for p, g in g_params:
                    pgrads[index[id(p)]] = g
            gout = _exchange_backward(model, seg, prev, gin)
            leaves[:] = outs[:] = [None] * n  # free the segment's graph as soon as it is done
        gx = None
        for g in gout:  # every column read the image: its gradient is the sum of theirs
            if g is not None:
                g = g.to(ctx.x_device)
                gx = g if gx is None else gx + g
        ctx.records = None
        return (None, gx, *pgrads)


def _column_backward(model, seg):
    def run(c, leaf, out, g):
        col = model.columns[c]
        params = [p for row in seg if row.widths[c] > 0 for p in getattr(col, row.name).parameters()
                  if p.requires_grad]
        inputs = ([leaf] if leaf.requires_grad else []) + params
        with torch.profiler.record_function(f"splitnet.column{c}.backward"):
            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
        g_leaf = grads[0] if leaf.requires_grad else None
        return g_leaf, list(zip(params, grads[1 if leaf.requires_grad else 0:]))
    return run


def _exchange_backward(model, seg, prev: list, gin: list) -> list:
    """Gradients of the segment's inputs (`gin`, per reading column) back to the tensors the columns
    produced before it (`prev`): through the exchange's concatenation when the segment starts at a
    crossing row (column s gets the sum over readers of its channel slice), else unchanged."""
    n = len(prev)
    if not seg[0].cross:
        return list(gin)
    out = [None] * n
    offsets, o = {}, 0
    for s, t in enumerate(prev):
        if t is not None:
            offsets[s] = (o, t.shape[1])
            o += t.shape[1]
    for d, g in enumerate(gin):
        if g is None:
            continue
        for s, (lo, w) in offsets.items():
            part = g[:, lo:lo + w].to(prev[s].device, non_blocking=True)
            out[s] = part if out[s] is None else out[s] + part
    return out


# ---- streams (one GPU) -------------------------------------------------------------------------
_streams: dict = {}


def _column_streams(device: torch.device, n: int) -> list:
    key = (device, n)
    if key not in _streams:
        _streams[key] = [torch.cuda.Stream(device) for _ in range(n)]
    return _streams[key]


def streams_forward(model, x: torch.Tensor) -> torch.Tensor:
    """Logits with each column's kernels on its own CUDA stream of the one GPU. Autograd records the
    streams; backward kernels run on the stream of their forward op and it inserts the waits where a
    gradient crosses streams, so backward overlaps as forward does."""
    dev = model.devices[0]
    n = model.layout.columns
    main = torch.cuda.current_stream(dev)
    streams = _column_streams(dev, n)
    x = x.to(dev, non_blocking=True)
    prev = [x] * n
    for s in streams:
        s.wait_stream(main)  # the input was produced on the caller's stream
        x.record_stream(s)  # and is read on s: keep the allocator from reusing it too early
    for seg in segments(model.layout):
        row = seg[0]
        outs = [None] * n
        for c in range(n):
            if row.widths[c] == 0 or prev[c] is None:
                continue
            with torch.cuda.stream(streams[c]):
                if row.cross:
                    for s, t in enumerate(prev):
                        if t is not None and s != c:
                            streams[c].wait_stream(streams[s])
                            t.record_stream(streams[c])
                    h = model.exchange.gather(row.name, prev, [c])[c]
                else:
                    h = prev[c]
                outs[c] = _run_column(model, c, seg, h, leaf=False)[1]
        prev = outs
    out = prev[model.layout.head]
    main.wait_stream(streams[model.layout.head])
    out.record_stream(main)
    return out


__all__ = ["STRATEGIES", "segments", "choose", "candidates", "unsupported", "threads_forward", "streams_forward"]
