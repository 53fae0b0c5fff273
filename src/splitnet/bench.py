"""`splitnet bench`: the split model against its single-device grouped equivalent, side by side.

Everything is measured in one process, in one run, interleaved (split, grouped, split, grouped, ...),
and reported as ratios, because absolute timings on shared machines are noise. JSON keys
(documented in the README's performance section):

  <placement>.train_step_s_split / _grouped   median seconds of one training step (forward, cross
                                             entropy, backward, SGD update) at --batch
  <placement>.train_ratio_split_over_grouped  the split's cost over the grouped network's (goal <= 1.05)
  <placement>.infer_ratio_split_over_grouped  the same for an eval-mode forward pass without grad
  <placement>.train_images_per_s_split, .infer_images_per_s_split
  <placement>.matmul_peak_gflops             fp32 matmul throughput measured there and then
  <placement>.train_mfu                       model FLOPs (6 x MACs per image: forward + backward)
                                             per second of the split model, over that peak
placement: "cpu" (the CPU emulation), "cuda" (both columns on cuda:0) when a GPU exists.

  data.decode_images_per_s_per_core     preparation: JPEG decode + rescale + centre crop, one process
  data.cached_images_per_s_per_core     training input from the cache (crop, flip, lighting, mean),
                                        in-process, one thread
  data.one_worker_images_per_s          the same through one DataLoader worker process
  data.cached_over_decode               goal >= 10
  data.one_worker_over_train_step       one worker's supply over the CPU training step's consumption
                                        (cpu.train_images_per_s_split); goal >= 3
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed of the split model vs the single-device grouped network")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="timed steps per model (after one warm-up)")
    p.add_argument("--layout", default="paper")
    p.add_argument("--placements", nargs="*", default=None,
                   help="cpu and/or cuda (default: cpu, plus cuda when a GPU exists)")
    p.add_argument("--no-data", action="store_true", help="skip the data path measurement")
    p.add_argument("--distributed", action="store_true",
                   help="also: 2 gloo ranks under torchrun vs one process (bench_dist.py)")
    p.set_defaults(func=_main)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, n: int = 2048, seconds: float = 1.0,
                       dtype=torch.float32) -> float:
    """Best sustained n x n matmul rate: the yardstick for model FLOP utilisation."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def _train_step(net, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def compare(layout: str = "paper", device: str = "cpu", batch: int = 128, reps: int = 3,
            num_classes: int = 1000) -> dict:
    """Split vs grouped training step and inference on `device` (both columns there)."""
    from .grouped import GroupedAlexNet
    from .layout import get_layout
    from .model import SplitAlexNet

    dev = torch.device(device)
    torch.manual_seed(0)
    split = SplitAlexNet(num_classes, layout, devices=(dev,) * get_layout(layout).columns)
    grouped = GroupedAlexNet(split.config).to(dev)
    grouped.load_state_dict(split.grouped_state_dict())
    x = torch.randn(batch, 3, split.input_side, split.input_side, device=dev) * 60
    y = torch.randint(0, num_classes, (batch,), device=dev)
    nets = {"split": split, "grouped": grouped}
    opts = {k: torch.optim.SGD(n.parameters(), lr=1e-5, momentum=0.9) for k, n in nets.items()}
    times = {f"{mode}_{k}": [] for mode in ("train", "infer") for k in nets}
    for name, net in nets.items():  # warm-up: allocator, oneDNN/cuDNN algorithm choice
        net.train()
        _train_step(net, opts[name], x, y)
    for _ in range(reps):
        for name, net in nets.items():
            net.train()
            times[f"train_{name}"].append(_timed(lambda: _train_step(net, opts[name], x, y), dev))
    with torch.no_grad():
        for net in nets.values():
            net.eval()
            net(x)
        for _ in range(reps):
            for name, net in nets.items():
                times[f"infer_{name}"].append(_timed(lambda: net(x), dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    macs = get_layout(layout, num_classes).macs_per_image()
    peak = matmul_peak_gflops(dev)
    res = {
        "device": str(dev), "layout": layout, "batch": batch, "reps": reps,
        "train_step_s_split": med["train_split"], "train_step_s_grouped": med["train_grouped"],
        "train_ratio_split_over_grouped": med["train_split"] / med["train_grouped"],
        "infer_s_split": med["infer_split"], "infer_s_grouped": med["infer_grouped"],
        "infer_ratio_split_over_grouped": med["infer_split"] / med["infer_grouped"],
        "train_images_per_s_split": batch / med["train_split"],
        "train_images_per_s_grouped": batch / med["train_grouped"],
        "infer_images_per_s_split": batch / med["infer_split"],
        "matmul_peak_gflops": peak,
        "train_mfu": 6 * macs * batch / med["train_split"] / 1e9 / peak,
        "all_times_s": times,
    }
    return res


def data_path(batch: int = 128, train_images_per_s: float | None = None) -> dict:
    """Images/s of preparation (decode) and of the cached training path, on a synthetic folder."""
    import shutil
    import tempfile

    from .data import DataConfig, make_loader, make_synthetic, prepare

    tmp = Path(tempfile.mkdtemp(prefix="splitnet-bench-"))
    threads = torch.get_num_threads()
    try:
        root = make_synthetic(tmp / "src", seed=0, classes=10, train_per_class=40, val_per_class=1, workers=1)
        t0 = time.perf_counter()
        report = prepare(root, tmp / "cache", workers=1, progress=False)
        decode = sum(sp["packed"] for sp in report["splits"].values()) / (time.perf_counter() - t0)
        cfg = DataConfig()
        torch.set_num_threads(1)
        rates = {}
        for workers in (0, 1):
            n, t0 = 0, None
            for epoch in range(3):
                for x, _ in make_loader(tmp / "cache", "train", min(batch, 400), seed=0, epoch=epoch,
                                        train=True, workers=workers, cfg=cfg):
                    if t0 is None:  # skip the first batch: worker start-up, page cache
                        t0 = time.perf_counter()
                        continue
                    n += len(x)
            rates[workers] = n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"decode_images_per_s_per_core": decode, "cached_images_per_s_per_core": rates[0],
           "one_worker_images_per_s": rates[1], "cached_over_decode": rates[0] / decode}
    if train_images_per_s:
        out["train_step_images_per_s"] = train_images_per_s
        out["one_worker_over_train_step"] = rates[1] / train_images_per_s
    return out


def distributed_vs_single(batch: int = 32, steps: int = 4) -> dict:
    """Run bench_dist.py in one process and under torchrun with 2 ranks (gloo on the CPU)."""
    import socket
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="splitnet-bdist-"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    common = ["--batch", str(batch), "--steps", str(steps)]
    subprocess.run([sys.executable, "-m", "splitnet.bench_dist", "--out", str(tmp / "one.json"), *common],
                   env=env, check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                    f"--master-port={port}", "-m", "splitnet.bench_dist", "--out", str(tmp / "two.json"), *common],
                   env=env, check=True)
    one = json.loads((tmp / "one.json").read_text())
    two = json.loads((tmp / "two.json").read_text())
    return {"batch": batch, "single_step_s": one["step_s"], "single_threads": one["threads"],
            "ranks2_step_s": two["step_s"], "ranks2_threads_per_rank": two["threads"],
            "ratio_ranks2_over_single": two["step_s"] / one["step_s"],
            "exchange_s_per_step": two.get("exchange_s_per_step", {}),
            "exchange_share": two.get("exchange_share", {})}


def _print(res: dict) -> None:
    for place, r in res.items():
        if not isinstance(r, dict) or "train_ratio_split_over_grouped" not in r:
            continue
        print(f"\n[{place}] layout={r['layout']} batch={r['batch']} reps={r['reps']} device={r['device']}")
        print(f"  {'':<10}{'split s':>10}{'grouped s':>11}{'ratio':>8}{'split img/s':>13}")
        for mode, key in (("train", "train_step_s"), ("inference", "infer_s")):
            s, g = r[f"{key}_split"], r[f"{key}_grouped"]
            print(f"  {mode:<10}{s:>10.3f}{g:>11.3f}{s / g:>8.3f}{r['batch'] / s:>13.1f}")
        print(f"  fp32 matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s, "
              f"training model FLOP utilisation {100 * r['train_mfu']:.1f}%")
    d = res.get("data")
    if d:
        print(f"\n[data] decode {d['decode_images_per_s_per_core']:.0f} img/s/core; cached path "
              f"{d['cached_images_per_s_per_core']:.0f} img/s/core (x{d['cached_over_decode']:.1f} decode); "
              f"one worker {d['one_worker_images_per_s']:.0f} img/s"
              + (f" (x{d['one_worker_over_train_step']:.1f} the CPU training step's "
                 f"{d['train_step_images_per_s']:.1f} img/s)" if "one_worker_over_train_step" in d else ""))


def run(placements=None, layout="paper", batch=128, reps=3, data: bool = True) -> dict:
    if placements is None:
        placements = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    res = {"host": {"python": sys.version.split()[0], "torch": torch.__version__,
                    "machine": platform.machine(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    for place in placements:
        if place == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("bench: placement 'cuda' asked for, but no CUDA device is present")
        res[place] = compare(layout, "cuda:0" if place == "cuda" else "cpu", batch, reps)
    if data:
        res["data"] = data_path(batch, res.get("cpu", {}).get("train_images_per_s_split"))
    return res


def _main(args) -> int:
    res = run(args.placements, args.layout, args.batch, args.reps, not args.no_data)
    if args.distributed:
        res["distributed"] = distributed_vs_single(batch=min(args.batch, 32))
        d = res["distributed"]
        print(f"\n[distributed] batch {d['batch']}: 2 gloo ranks {d['ranks2_step_s']:.3f} s/step vs one process "
              f"{d['single_step_s']:.3f} s/step (ratio {d['ratio_ranks2_over_single']:.2f}); exchange time share: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in d["exchange_share"].items()))
    _print(res)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {out}")
    return 0
