"""Training step time under torchrun (one column per rank) against one process; the exchanges' time
share per layer; the gradient reduction overlapped with backward against one flat all-reduce; and the
bytes each rank sends.

    python -m splitnet.bench.dist --out A.json                               # one process (baseline)
    torchrun --nproc-per-node=2 -m splitnet.bench.dist --out B.json          # 1 replica x 2 columns
    torchrun --nproc-per-node=4 -m splitnet.bench.dist --out C.json          # 2 replicas x 2 columns

Each run times `--steps` training steps (after one warm-up) of the paper layout at `--batch` (the global
batch) on random data: the step training takes (timing.train_step through train/runtime.py: PaperSGD,
the run's dropout masks, gradient averaging over replicas, the per-step agreement on the loss; one
process: the concurrency strategy training would pick). Under torchrun it also times, on every rank,
the collectives of each crossing layer (under NCCL with the device synchronised before and after, as
its collectives return before they run: those synchronisations, which a training step does not make,
are inside step_s). With replicas, steps alternate between the two gradient reductions of
train/grad_sync.py on the same model (FlatReduce, BucketReduce): interleaved, so drifts of a shared
machine fall on both. rank 0 writes the JSON:
  step_s                      median training step time (with replicas: of the overlapped steps)
  exchange_s_per_step[layer]  seconds per step spent in that layer's collectives (rank 0)
  exchange_share[layer]       that, as a share of the step
  reduce                      with replicas: flat_step_s, overlap_step_s (medians), the ratio
                              overlap / flat per interleaved pair (median, min, max; every pair;
                              how many pairs had the overlapped step faster, for a sign test)
  sent                        per rank: bytes sent in one step, counted at the collectives
                              (distributed.traffic), and the layout's count (expected_traffic)
`splitnet bench --distributed` runs all three (distributed_vs_single, below) and prints the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..train import distributed as D
from ..model.config import ModelConfig
from ..train.config import TrainConfig
from ..train.distributed import world_from_env
from ..train.grad_sync import FlatReduce
from ..train.memory import keep_freed_memory
from ..train.runtime import DistRuntime, LocalRuntime
from .timing import paper_optimizer, spread, timed, train_step, training_strategy


def distributed_vs_single(batch: int = 32, steps: int = 4, geometry: str = "imagenet", pairs: int = 24) -> dict:
    """Run this module in one process, under torchrun with 2 ranks (`steps` timed steps each) and with
    4 ranks (2 replicas x 2 columns, `pairs` interleaved pairs of overlapped and flat reduction steps:
    enough for a confidence interval of the median ratio; gloo on the CPU, NCCL where GPUs are present;
    the one process then runs on the GPUs too, as training would place it). geometry: the paper's
    network ("imagenet") or its CIFAR-scale family ("cifar": the tests' quick run of the same machinery)."""
    tmp = Path(tempfile.mkdtemp(prefix="splitnet-bdist-"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    common = ["--batch", str(batch), "--geometry", geometry]
    subprocess.run([sys.executable, "-m", "splitnet.bench.dist", "--out", str(tmp / "one.json"), *common,
                    "--steps", str(steps)], env=env, check=True)
    runs = {}
    for ranks in (2, 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                        "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "splitnet.bench.dist",
                        "--out", str(tmp / f"ranks{ranks}.json"), *common,
                        "--steps", str(steps if ranks == 2 else pairs)], env=env, check=True)
        runs[ranks] = json.loads((tmp / f"ranks{ranks}.json").read_text())
    one, two, four = json.loads((tmp / "one.json").read_text()), runs[2], runs[4]
    return {"batch": batch, "single_step_s": one["step_s"], "single_threads": one["threads"],
            "single_strategy": one["strategy"],
            "ranks2_step_s": two["step_s"], "ranks2_threads_per_rank": two["threads"],
            "ratio_ranks2_over_single": two["step_s"] / one["step_s"],
            "exchange_s_per_step": two.get("exchange_s_per_step", {}),
            "exchange_share": two.get("exchange_share", {}),
            "ranks4_reduce": four["reduce"], "ranks4_sent": four["sent"], "ranks2_sent": two["sent"]}


def _collective_clock(group) -> float:
    """A clock reading for a collective's time. NCCL collectives are queued on the GPU and return at
    once: the device is synchronised first, so the reading falls after the work queued before the
    collective (start) or after the collective itself (end). gloo returns when the data is there."""
    if dist.get_backend(group) == "nccl":
        torch.cuda.synchronize()
    return time.perf_counter()


def _timed_gather(layer_times):
    """Wrap the exchange's autograd functions (distributed._GatherColumns, _GatherToReader) so each
    call's collective time is added to layer_times[layer]."""
    for fn in (D._GatherColumns, D._GatherToReader):
        _time_function(fn, layer_times)


def _time_function(fn, layer_times) -> None:
    orig_fwd, orig_bwd = fn.forward, fn.backward

    def fwd(ctx, x, group, *args):
        t0 = _collective_clock(group)
        out = orig_fwd(ctx, x, group, *args)
        ctx._t_layer = D._current_layer[0]
        layer_times[ctx._t_layer] = layer_times.get(ctx._t_layer, 0.0) + _collective_clock(group) - t0
        return out

    def bwd(ctx, grad):
        t0 = _collective_clock(ctx.group)
        out = orig_bwd(ctx, grad)
        layer_times[ctx._t_layer] = layer_times.get(ctx._t_layer, 0.0) + _collective_clock(ctx.group) - t0
        return out

    fn.forward = staticmethod(fwd)
    fn.backward = staticmethod(bwd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.bench.dist")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--geometry", default="imagenet", choices=("imagenet", "cifar"))
    args = p.parse_args(argv)
    keep_freed_memory()  # as `splitnet train` does, in both the single process and every rank

    world = world_from_env()
    torch.manual_seed(0)
    layer_times: dict = {}
    cfg = TrainConfig(model=ModelConfig(geometry=args.geometry))
    rt = DistRuntime(2, timeout_s=300) if world > 1 else LocalRuntime()
    mesh = rt.mesh
    if mesh is not None:
        _timed_gather(layer_times)
    model = rt.build_model(cfg, 1000)  # one process: the devices training picks (GPUs, else the CPU)
    if mesh is None:
        model.concurrency = training_strategy(model, args.batch)
    model.train()
    opt = paper_optimizer(model, cfg.optim)
    # This rank's rows of the global batch (data parallel replicas), as training shares them.
    offset, rows = rt.share(args.batch)
    x = (torch.randn(rows, 3, model.input_side, model.input_side) * 60).to(model.devices[model.local[0]])
    y = torch.randint(0, 1000, (rows,)).to(model.devices[model.layout.head])
    reducers = _reducers(rt, model)  # {"overlap": ..., "flat": ...} with replicas, else {"none": None}
    times, sent = _time_steps(model, opt, (x, y), rt, reducers, args, offset, layer_times)
    first = list(reducers)[0]
    step_s = statistics.median(times[first])
    res = {"world": world, "batch": args.batch, "steps": args.steps, "step_s": step_s,
           "threads": torch.get_num_threads(), "device": str(x.device), "strategy": model.strategy}
    if layer_times:
        n = len(times[first]) * len(reducers)
        res["exchange_s_per_step"] = {k: v / n for k, v in layer_times.items()}
        res["exchange_share"] = {k: v / n / step_s for k, v in layer_times.items()}
    if "flat" in times:
        res["reduce"] = _reduce_pairs(times, step_s, reducers)
    if mesh is not None:
        res["sent"] = _gather_sent(mesh, sent, model, rows)
    if mesh is None or mesh.rank == 0:
        Path(args.out).write_text(json.dumps(res, indent=2))
    rt.close()
    return 0


def _time_steps(model, opt, xy, rt, reducers: dict, args, offset: int, layer_times: dict) -> tuple:
    """({reducer: [step seconds]}, bytes sent in the first timed non-flat step): args.steps steps per
    reducer after one warm-up, interleaved; layer_times restarts after the warm-up."""
    sync = sorted(set(model.devices), key=str)
    times = {name: [] for name in reducers}
    sent = None
    for step in range(args.steps * len(reducers) + 1):
        name = list(reducers)[step % len(reducers)]  # interleaved: overlap, flat, overlap, ...
        _use(rt, reducers, name)
        if step == 1:
            layer_times.clear()
        D.traffic.clear()
        t = timed(lambda: train_step(model, opt, *xy, step=step, rt=rt, full_batch=args.batch, offset=offset),
                  sync)
        if step:
            times[name].append(t)
        if step and name != "flat" and sent is None:
            sent = dict(D.traffic)
    return times, sent


def _reduce_pairs(times: dict, step_s: float, reducers: dict) -> dict:
    """Overlapped against flat gradient reduction, pair by interleaved pair."""
    pairs = [o / f for o, f in zip(times["overlap"], times["flat"])]
    return {"flat_step_s": statistics.median(times["flat"]), "overlap_step_s": step_s,
            "ratio_overlap_over_flat": spread(pairs), "pairs": pairs,
            "overlap_faster_pairs": sum(r < 1 for r in pairs), "buckets": len(reducers["overlap"].buckets)}


def _gather_sent(mesh, sent, model, rows: int) -> list:
    """Every rank's bytes sent in a step beside the layout's count (an all_gather: every rank calls it)."""
    mine = {"rank": mesh.rank, "column": mesh.column, "replica": mesh.replica, "sent": sent,
            "expected": D.expected_traffic(model.layout, mesh.replicas, mesh.column, rows)}
    got = [None] * mesh.world
    dist.all_gather_object(got, mine)
    return got


def _reducers(rt, model) -> dict:
    """The gradient reductions to compare: training's BucketReduce (overlapped) and FlatReduce, on the
    same model and data group; {"none": None} without replicas."""
    if getattr(rt, "reducer", None) is None:
        return {"none": None}
    m = rt.mesh
    return {"overlap": rt.reducer, "flat": FlatReduce(model.parameters(), m.data_group, m.replicas, D.count_sent)}


def _use(rt, reducers: dict, name: str) -> None:
    if name == "none":
        return
    reducers["overlap"].enabled = name == "overlap"  # its hooks launch nothing during a flat step
    rt.reducer = reducers[name]


if __name__ == "__main__":
    raise SystemExit(main())
