"""Training step time under torchrun (one column per rank) against one process, and the time share of
the exchanges per layer.

    python -m splitnet.bench.dist --out A.json                               # one process (baseline)
    torchrun --nproc-per-node=2 -m splitnet.bench.dist --out B.json          # 2 gloo ranks / NCCL GPUs

Each run times `--steps` training steps (after one warm-up) of the paper layout at `--batch` on random
data. Under torchrun it also times, on every rank, the collectives of each crossing layer (forward
all-gather and backward all-reduce, synchronised on the device), and rank 0 writes the JSON:
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
import torch.nn.functional as F

from ..model.columns import SplitAlexNet
from ..train import distributed as D
from ..train.config import TrainConfig
from ..train.distributed import world_from_env
from ..train.memory import keep_freed_memory


def distributed_vs_single(batch: int = 32, steps: int = 4) -> dict:
    """Run this module in one process and under torchrun with 2 ranks (gloo on the CPU)."""
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
            "ranks2_step_s": two["step_s"], "ranks2_threads_per_rank": two["threads"],
            "ratio_ranks2_over_single": two["step_s"] / one["step_s"],
            "exchange_s_per_step": two.get("exchange_s_per_step", {}),
            "exchange_share": two.get("exchange_share", {})}


def _timed_gather(layer_times):
    """Wrap distributed._GatherColumns so each call's collective time is added to layer_times[layer]."""
    orig_fwd, orig_bwd = D._GatherColumns.forward, D._GatherColumns.backward

    def fwd(ctx, x, group, columns, index):
        t0 = time.perf_counter()
        out = orig_fwd(ctx, x, group, columns, index)
        ctx._t_layer = D._current_layer[0]
        layer_times[ctx._t_layer] = layer_times.get(ctx._t_layer, 0.0) + time.perf_counter() - t0
        return out

    def bwd(ctx, grad):
        t0 = time.perf_counter()
        out = orig_bwd(ctx, grad)
        layer_times[ctx._t_layer] = layer_times.get(ctx._t_layer, 0.0) + time.perf_counter() - t0
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
    if world > 1:
        mesh = D.init_mesh(2, timeout_s=300)
        _timed_gather(layer_times)
        model = D.build_model(TrainConfig(), 1000, mesh)
        b = args.batch // mesh.replicas
        dev = mesh.device
    else:
        mesh = None
        model = SplitAlexNet(1000, devices="cpu")
        b = args.batch
        dev = torch.device("cpu")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    x = torch.randn(b, 3, 224, 224, device=dev) * 60
    y = torch.randint(0, 1000, (b,), device=dev)
    times = []
    for step in range(args.steps + 1):
        if step == 1:
            layer_times.clear()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y) if logits is not None else None
        if mesh is None:
            loss.backward()
        else:
            D.backward(model, loss)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    res = {"world": world, "batch": args.batch, "steps": args.steps, "step_s": step_s,
           "threads": torch.get_num_threads(), "device": str(dev)}
    if layer_times:
        res["exchange_s_per_step"] = {k: v / args.steps for k, v in layer_times.items()}
        res["exchange_share"] = {k: v / args.steps / step_s for k, v in layer_times.items()}
    if mesh is None or mesh.rank == 0:
        Path(args.out).write_text(json.dumps(res, indent=2))
    if mesh is not None:
        D.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
