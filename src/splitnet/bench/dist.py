"""Training step time under torchrun (one column per rank) against one process, and the time share of
the exchanges per layer.

    python -m splitnet.bench.dist --out A.json                               # one process (baseline)
    torchrun --nproc-per-node=2 -m splitnet.bench.dist --out B.json          # 2 gloo ranks / NCCL GPUs

Each run times `--steps` training steps (after one warm-up) of the paper layout at `--batch` on random
data: the step training takes (timing.train_step through train/runtime.py: PaperSGD, the run's dropout
masks, gradient averaging over replicas, the per-step agreement on the loss; one process: the
concurrency strategy training would pick). Under torchrun it also times, on every rank, the
collectives of each crossing layer (forward all-gather and backward all-reduce; under NCCL with the
device synchronised before and after, as its collectives return before they run: those
synchronisations, which a training step does not make, are inside step_s), and rank 0 writes the JSON:
  step_s                      median training step time
  exchange_s_per_step[layer]  seconds per step spent in that layer's collectives (rank 0)
  exchange_share[layer]       that, as a share of the step
`splitnet bench --distributed` runs both (distributed_vs_single, below) and prints the ratio.
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
from ..train.config import TrainConfig
from ..train.distributed import world_from_env
from ..train.memory import keep_freed_memory
from ..train.runtime import DistRuntime, LocalRuntime
from .timing import paper_optimizer, timed, train_step, training_strategy


def distributed_vs_single(batch: int = 32, steps: int = 4) -> dict:
    """Run this module in one process and under torchrun with 2 ranks (gloo on the CPU, NCCL where
    GPUs are present; the one process then runs on the GPUs too, as training would place it)."""
    tmp = Path(tempfile.mkdtemp(prefix="splitnet-bdist-"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    common = ["--batch", str(batch), "--steps", str(steps)]
    subprocess.run([sys.executable, "-m", "splitnet.bench.dist", "--out", str(tmp / "one.json"), *common],
                   env=env, check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                    f"--master-port={port}", "-m", "splitnet.bench.dist", "--out", str(tmp / "two.json"), *common],
                   env=env, check=True)
    one = json.loads((tmp / "one.json").read_text())
    two = json.loads((tmp / "two.json").read_text())
    return {"batch": batch, "single_step_s": one["step_s"], "single_threads": one["threads"],
            "single_strategy": one["strategy"],
            "ranks2_step_s": two["step_s"], "ranks2_threads_per_rank": two["threads"],
            "ratio_ranks2_over_single": two["step_s"] / one["step_s"],
            "exchange_s_per_step": two.get("exchange_s_per_step", {}),
            "exchange_share": two.get("exchange_share", {})}


def _collective_clock(group) -> float:
    """A clock reading for a collective's time. NCCL collectives are queued on the GPU and return at
    once: the device is synchronised first, so the reading falls after the work queued before the
    collective (start) or after the collective itself (end). gloo returns when the data is there."""
    if dist.get_backend(group) == "nccl":
        torch.cuda.synchronize()
    return time.perf_counter()


def _timed_gather(layer_times):
    """Wrap distributed._GatherColumns so each call's collective time is added to layer_times[layer]."""
    orig_fwd, orig_bwd = D._GatherColumns.forward, D._GatherColumns.backward

    def fwd(ctx, x, group, columns, index):
        t0 = _collective_clock(group)
        out = orig_fwd(ctx, x, group, columns, index)
        ctx._t_layer = D._current_layer[0]
        layer_times[ctx._t_layer] = layer_times.get(ctx._t_layer, 0.0) + _collective_clock(group) - t0
        return out

    def bwd(ctx, grad):
        t0 = _collective_clock(ctx.group)
        out = orig_bwd(ctx, grad)
        layer_times[ctx._t_layer] = layer_times.get(ctx._t_layer, 0.0) + _collective_clock(ctx.group) - t0
        return out

    D._GatherColumns.forward = staticmethod(fwd)
    D._GatherColumns.backward = staticmethod(bwd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.bench.dist")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    keep_freed_memory()  # as `splitnet train` does, in both the single process and every rank

    world = world_from_env()
    torch.manual_seed(0)
    layer_times: dict = {}
    cfg = TrainConfig()
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
    x, y, offset = rt.share(torch.randn(args.batch, 3, model.input_side, model.input_side) * 60,
                            torch.randint(0, 1000, (args.batch,)))
    x = x.to(model.devices[model.local[0]])
    y = y.to(model.devices[model.layout.head])
    sync = sorted(set(model.devices), key=str)
    times = []
    for step in range(args.steps + 1):
        if step == 1:
            layer_times.clear()
        t = timed(lambda: train_step(model, opt, x, y, step=step, rt=rt, full_batch=args.batch, offset=offset),
                  sync)
        if step:
            times.append(t)
    step_s = statistics.median(times)
    res = {"world": world, "batch": args.batch, "steps": args.steps, "step_s": step_s,
           "threads": torch.get_num_threads(), "device": str(x.device), "strategy": model.strategy}
    if layer_times:
        res["exchange_s_per_step"] = {k: v / args.steps for k, v in layer_times.items()}
        res["exchange_share"] = {k: v / args.steps / step_s for k, v in layer_times.items()}
    if mesh is None or mesh.rank == 0:
        Path(args.out).write_text(json.dumps(res, indent=2))
    rt.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
