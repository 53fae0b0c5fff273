"""`splitnet bench`: the split model against its single-device grouped equivalent, side by side.

Everything is measured in one process, in one run, interleaved (split, grouped, split, grouped, ...),
and reported as ratios, because absolute timings on shared machines are noise. JSON sections:

  cpu            the CPU emulation (both columns on the CPU), fp32
  cuda           both columns on cuda:0, fp32 (TF32 off); cuda_tf32, cuda_bf16 (autocast),
                 cuda_bf16_cl (bf16 + channels_last): the same for each numeric mode
  cuda2          columns on cuda:0 and cuda:1 (bf16) vs the grouped network on cuda:0;
                 cuda2_one_gpu: both columns on cuda:0 in the same run
Keys of each section:
  train_step_s_split / _grouped   median seconds of one training step (forward, cross entropy,
                                  backward, SGD update) at --batch; "split" is the default strategy
  train_step_s_split_<strategy>   the same per concurrency strategy timed (model/concurrent.py): threads and
                                  sequential on the CPU, sequential and streams on one GPU
  default_strategy, best_strategy what "auto" picks there (CPU: the rule in concurrent.choose; one GPU:
                                  the faster, as training's calibration, model/tune.py, picks), and what
                                  was fastest in this run
  train_ratio_split_over_grouped  the default's cost over the grouped network's (goal <= 1.05 on the
                                  CPU, <= 1.10 on one GPU); train_ratio_split_<strategy>_over_grouped
  infer_ratio_split_over_grouped  the same for an eval-mode forward pass without grad
  train_images_per_s_split, train_images_per_s_grouped, infer_images_per_s_split
  matmul_peak_gflops, matmul_peak_dtype   matmul throughput measured there and then (fp32 on the CPU;
                                  the mode's dtype on a GPU: fp32, fp32+tf32, bfloat16)
  train_mfu                       model FLOPs (6 x MACs per image: forward + backward) per second of the
                                  split model, over that peak (goal >= 0.45 on the CPU)
  cuda2.train_ratio_two_gpus_over_one   split across two GPUs over both columns on one
  cuda_input                      training images/s fed from the uint8 cache: device_input (augmented on
                                  the GPU, data/device_input.py) and cpu_input (augmented by the
                                  workers), each over train_images_per_s_on_device_batches;
                                  train_loop: `splitnet train` itself (train_loop_rate), the goal's
                                  figure: train_loop_over_on_device >= 0.8
  overlap.<case>                  profiler-measured concurrency of the columns: busy_s (time any
                                  column works), both_s (time two or more do), overlap = both / busy;
                                  cases cpu_threads, cuda_streams, cuda_sequential, cuda2

  data.decode_images_per_s_per_core     preparation: JPEG decode + rescale + centre crop, one process
  data.cached_images_per_s_per_core     training input from the cache (crop, flip, lighting, mean),
                                        in-process, one thread
  data.one_worker_images_per_s          the same through one DataLoader worker process (each epoch's
                                        first batch, when the worker starts, untimed)
  data.cached_over_decode               goal >= 10
  data.one_worker_over_train_step       one worker's supply over the CPU training step's consumption
                                        (cpu.train_images_per_s_split); goal >= 3
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import DataConfig, DeviceBatches, PackedDataset, make_loader, make_synthetic, prepare
from ..model.columns import SplitAlexNet
from ..model.concurrent import choose
from ..model.grouped import GroupedAlexNet
from ..model.layout import get_layout
from ..model.placement import DeviceError, synchronize
from ..model.precision import PRECISIONS, autocast_dtype, memory_format, precision
from ..train.config import load_config
from ..train.loop import read_metrics, train


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed of the split model vs the single-device grouped network")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="timed steps per model (after one warm-up)")
    p.add_argument("--layout", default="paper")
    p.add_argument("--placements", nargs="*", default=None, choices=["cpu", "cuda", "cuda2"],
                   help="cpu, cuda (both columns on cuda:0), cuda2 (cuda:0 + cuda:1); default: what exists")
    p.add_argument("--no-data", action="store_true", help="skip the data path measurement")
    p.add_argument("--precisions", nargs="*", default=None, choices=list(PRECISIONS),
                   help="GPU numeric modes to time (default: all)")
    p.add_argument("--no-overlap", action="store_true", help="skip the profiler's overlap measurement")
    p.add_argument("--traces", default=None, help="keep the profiler's Chrome traces in this folder")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time torch.compile'd sequential split and grouped networks (default backend inductor)")
    p.add_argument("--distributed", action="store_true",
                   help="also: 2 gloo ranks under torchrun vs one process (bench/dist.py)")
    p.set_defaults(func=_main)


def matmul_peak_gflops(device: torch.device, n: int = 2048, seconds: float = 1.0,
                       dtype=torch.float32) -> float:
    """Best sustained n x n matmul rate: the yardstick for model FLOP utilisation."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize([device])
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize([device])
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def _train_step(net, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def _timed(fn, devices) -> float:
    synchronize(devices)
    t0 = time.perf_counter()
    fn()
    synchronize(devices)
    return time.perf_counter() - t0


def strategies_for(devices) -> list:
    """The concurrency strategies worth timing for a placement (model/concurrent.py)."""
    devs = [torch.device(d) for d in devices]
    if all(d.type == "cpu" for d in devs):
        return ["threads", "sequential"]
    if len(set(devs)) == 1:
        return ["sequential", "streams"]
    return ["sequential"]


def compare(layout: str = "paper", device="cpu", batch: int = 128, reps: int = 3,
            num_classes: int = 1000, mode: str = "fp32", strategies=None, baseline_device=None,
            compile_backend: str | None = None) -> dict:
    """Training step and inference of the split model (each concurrency strategy) against the
    single-device grouped network, interleaved, in one process.

    device: one device for every column, or one per column (two GPUs). The grouped network runs on
    `baseline_device` (default: the first column's device). mode: a key of PRECISIONS.
    compile_backend: also time torch.compile(backend=...) of the sequential split model and of the
    grouped network ("split_sequential_compiled", "grouped_compiled"; dropout from the global RNG, as
    here). The threads strategy is not compiled (its columns run in worker threads)."""
    ncol = get_layout(layout).columns
    devices = tuple(torch.device(d) for d in (device if isinstance(device, (tuple, list)) else (device,) * ncol))
    base = torch.device(baseline_device) if baseline_device else devices[0]
    dtype_t = devices[0].type
    strategies = strategies or strategies_for(devices)
    torch.manual_seed(0)
    nets = {}
    for st in strategies:
        nets[f"split_{st}"] = SplitAlexNet(num_classes, layout, devices=devices, concurrency=st)
        if st != strategies[0]:
            nets[f"split_{st}"].load_state_dict(nets[f"split_{strategies[0]}"].state_dict())
    first = nets[f"split_{strategies[0]}"]
    default = choose(first, "auto")
    grouped = GroupedAlexNet(first.config).to(base)
    grouped.load_state_dict(first.grouped_state_dict())
    nets["grouped"] = grouped
    compiled = []
    if compile_backend:
        seq = SplitAlexNet(num_classes, layout, devices=devices, concurrency="sequential")
        seq.load_state_dict(first.state_dict())
        g2 = GroupedAlexNet(first.config).to(base)
        g2.load_state_dict(first.grouped_state_dict())
        nets["split_sequential_compiled"] = torch.compile(seq, backend=compile_backend)
        nets["grouped_compiled"] = torch.compile(g2, backend=compile_backend)
        compiled = ["split_sequential_compiled", "grouped_compiled"]
    fmt = memory_format(mode)
    x = torch.randn(batch, 3, first.input_side, first.input_side) * 60
    y = torch.randint(0, num_classes, (batch,))
    xs = {}
    for name, net in nets.items():
        net.to(memory_format=fmt)
        grouped_net = name.startswith("grouped")
        xs[name] = (x.to(base if grouped_net else devices[0]).contiguous(memory_format=fmt),
                    y.to(base if grouped_net else devices[first.layout.head]))
    opts = {k: torch.optim.SGD(n.parameters(), lr=1e-5, momentum=0.9) for k, n in nets.items()}
    sync = sorted(set(devices) | {base}, key=str)
    times = {f"{m}_{k}": [] for m in ("train", "infer") for k in nets}
    with precision(mode, dtype_t):
        for name, net in nets.items():  # warm-up: allocator, oneDNN/cuDNN algorithm choice
            net.train()
            _train_step(net, opts[name], *xs[name])
        for _ in range(reps):
            for name, net in nets.items():
                times[f"train_{name}"].append(_timed(lambda: _train_step(net, opts[name], *xs[name]), sync))
        with torch.no_grad():
            for name, net in nets.items():
                net.eval()
                net(xs[name][0])
            for _ in range(reps):
                for name, net in nets.items():
                    times[f"infer_{name}"].append(_timed(lambda: net(xs[name][0]), sync))
    med = {k: statistics.median(v) for k, v in times.items()}
    macs = get_layout(layout, num_classes).macs_per_image()
    peak_dtype = autocast_dtype(mode) or torch.float32
    with precision(mode, dtype_t):  # the best of a few sizes: a peak, not one size's rate
        peak = max(matmul_peak_gflops(devices[0], n=n, dtype=peak_dtype)
                   for n in ((4096, 8192) if dtype_t == "cuda" else (1024, 2048, 3072)))
    best = min(strategies, key=lambda st: med[f"train_split_{st}"])
    if dtype_t == "cuda" and len(strategies) > 1:
        default = best  # a training run times the candidates on a GPU and keeps the faster (model/tune.py)
    split = f"split_{default}" if default in strategies else f"split_{strategies[0]}"
    res = {
        "device": ", ".join(str(d) for d in devices), "grouped_device": str(base), "layout": layout,
        "batch": batch, "reps": reps, "precision": mode,
        "default_strategy": split[len("split_"):], "best_strategy": best, "strategies": strategies,
        "train_step_s_split": med[f"train_{split}"], "train_step_s_grouped": med["train_grouped"],
        "train_ratio_split_over_grouped": med[f"train_{split}"] / med["train_grouped"],
        "infer_s_split": med[f"infer_{split}"], "infer_s_grouped": med["infer_grouped"],
        "infer_ratio_split_over_grouped": med[f"infer_{split}"] / med["infer_grouped"],
        "train_images_per_s_split": batch / med[f"train_{split}"],
        "train_images_per_s_grouped": batch / med["train_grouped"],
        "infer_images_per_s_split": batch / med[f"infer_{split}"],
        "matmul_peak_gflops": peak, "matmul_peak_dtype": str(peak_dtype).replace("torch.", "")
        + ("+tf32" if PRECISIONS[mode][0] and peak_dtype == torch.float32 and dtype_t == "cuda" else ""),
        "train_mfu": 6 * macs * batch / med[f"train_{split}"] / 1e9 / peak,
        "all_times_s": times,
    }
    for name in compiled:
        res[f"train_step_s_{name}"], res[f"infer_s_{name}"] = med[f"train_{name}"], med[f"infer_{name}"]
        res[f"train_ratio_{name}_over_grouped"] = med[f"train_{name}"] / med["train_grouped"]
    if compiled:
        res["compile_backend"] = compile_backend
    for st in strategies:
        res[f"train_step_s_split_{st}"] = med[f"train_split_{st}"]
        res[f"infer_s_split_{st}"] = med[f"infer_split_{st}"]
        res[f"train_ratio_split_{st}_over_grouped"] = med[f"train_split_{st}"] / med["train_grouped"]
    return res


def busy_overlap(lanes: dict) -> dict:
    """lanes: {lane: [(start, end), ...]} busy intervals (any unit). Returns the time at least one lane
    is busy, the time two or more are, and their ratio ("overlap": 0 = strictly one after the other,
    1 = always together)."""
    edges = []
    for ivs in lanes.values():
        for a, b in _union(ivs):
            edges += [(a, 1), (b, -1)]
    edges.sort()
    busy = both = 0.0
    depth, last = 0, None
    for t, d in edges:
        if last is not None:
            busy += (t - last) if depth >= 1 else 0.0
            both += (t - last) if depth >= 2 else 0.0
        depth += d
        last = t
    return {"lanes": len(lanes), "busy": busy, "both": both, "overlap": both / busy if busy else 0.0}


def _union(ivs):
    out = []
    for a, b in sorted(ivs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def column_overlap(model, x: torch.Tensor, steps: int = 3, trace: str | None = None) -> dict:
    """Profile `steps` forward + backward passes and measure how much the columns overlap in time.

    GPU: lanes are the (device, stream) pairs the kernels ran on; CPU emulation: lanes are the columns'
    profiler ranges (`splitnet.column<c>` forward, `.backward` backward, recorded by model/concurrent.py).
    With `trace`, the Chrome trace is kept there (open it in chrome://tracing or Perfetto)."""
    from torch.profiler import ProfilerActivity, profile  # here: only the overlap measurement profiles

    cuda = any(d.type == "cuda" for d in model.devices)
    y = torch.zeros(x.shape[0], dtype=torch.int64, device=model.devices[model.layout.head])

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        synchronize(model.devices)

    step()  # warm-up outside the trace
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:  # the profiler records the calling thread only, unless told otherwise (torch >= 2.6)
        from torch._C._profiler import _ExperimentalConfig
        extra = {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):
        extra = {}
    with profile(activities=acts, **extra) as prof:
        for _ in range(steps):
            step()
    path = Path(trace) if trace else Path(tempfile.mkdtemp(prefix="splitnet-trace-")) / "trace.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    lanes: dict = {}
    for ev in events:
        if ev.get("ph") != "X":
            continue
        if cuda:
            if ev.get("cat") != "kernel":
                continue
            key = (ev.get("args", {}).get("device"), ev.get("args", {}).get("stream"))
        else:
            m = re.fullmatch(r"splitnet\.column(\d+)(\.backward)?", ev.get("name", ""))
            if not m:
                continue
            key = int(m.group(1))
        lanes.setdefault(key, []).append((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])))
    res = busy_overlap(lanes)
    res.update(strategy=model.strategy, steps=steps, kind="kernels per (device, stream)" if cuda else
               "column ranges per thread", busy_s=res.pop("busy") / 1e6, both_s=res.pop("both") / 1e6)
    if trace:
        res["trace"] = str(path)
    else:
        shutil.rmtree(path.parent, ignore_errors=True)
    return res


@contextlib.contextmanager
def _synthetic_cache(per_class: int, workers: int):
    """A temporary prepared synthetic set (10 classes x per_class training images): yields (cache
    folder, images packed, seconds the preparation took); removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="splitnet-bench-"))
    try:
        root = make_synthetic(tmp / "src", seed=0, classes=10, train_per_class=per_class, val_per_class=1,
                              workers=workers)
        t0 = time.perf_counter()
        report = prepare(root, tmp / "cache", workers=workers, progress=False)
        packed = sum(sp["packed"] for sp in report["splits"].values())
        yield tmp / "cache", packed, time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rate(epochs, step=None, devices=(), skip: int = 1) -> float:
    """Images/s over `epochs` (iterables of (x, y) batches, each batch passed to `step` if given).
    A DataLoader starts its worker processes at every epoch, a cost a real run pays once per
    thousands of batches: in each epoch the clock starts after the first `skip` batches (the
    workers' first batches). `devices` are synchronised before each clock reading."""
    n = seconds = 0
    for batches in epochs:
        k, t = _count(batches, step, devices, skip)
        n, seconds = n + k, seconds + t
    return n / seconds if n else 0.0


def _count(batches, step, devices, skip: int) -> tuple:
    """(images, seconds) after the first `skip` batches of one epoch."""
    n, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if step is not None:
            step(x, y)
        if i + 1 < skip:
            continue
        if t0 is None:
            synchronize(devices)
            t0 = time.perf_counter()
            continue
        n += len(x)
    synchronize(devices)
    return n, (time.perf_counter() - t0 if t0 is not None else 0.0)


def data_path(batch: int = 128, train_images_per_s: float | None = None) -> dict:
    """Images/s of preparation (decode) and of the cached training path, on a synthetic folder."""
    threads = torch.get_num_threads()
    with _synthetic_cache(per_class=60, workers=1) as (cache, packed, seconds):
        decode = packed / seconds
        cfg = DataConfig()
        torch.set_num_threads(1)
        try:
            rates = {workers: _rate(make_loader(cache, "train", min(batch, 600), seed=0, epoch=epoch, train=True,
                                                workers=workers, cfg=cfg) for epoch in range(3))
                     for workers in (0, 1)}  # 4 batches an epoch, the first untimed
        finally:
            torch.set_num_threads(threads)
    out = {"decode_images_per_s_per_core": decode, "cached_images_per_s_per_core": rates[0],
           "one_worker_images_per_s": rates[1], "cached_over_decode": rates[0] / decode}
    if train_images_per_s:
        out["train_step_images_per_s"] = train_images_per_s
        out["one_worker_over_train_step"] = rates[1] / train_images_per_s
    return out


def input_path(device="cuda:0", batch: int = 128, mode: str = "bf16", workers: int | None = None,
               per_class: int = 600, epochs: int = 1) -> dict:
    """Training images/s fed from the uint8 cache against training on one batch already on the device.

    "device" path: DataLoader workers gather uint8 images, DeviceBatches crops, mirrors, lights and
    subtracts the mean on the device one batch ahead (data/device_input.py). "cpu" path: the workers
    do all of it and send float32 crops. Synthetic 256x256 images, 10 classes x `per_class` (the
    default: 46 batches of 128, a few hundred milliseconds of a fast GPU's training).
    """
    dev = torch.device(device)
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    with _synthetic_cache(per_class, workers) as (cache, _, _):
        torch.manual_seed(0)
        model = SplitAlexNet(10, devices=dev)
        opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
        head = model.devices[model.layout.head]
        cfg = DataConfig(workers=workers)
        sync = sorted(set(model.devices), key=str)

        def epoch_batches(epoch: int, on_device: bool):
            loader = make_loader(cache, "train", batch, seed=0, epoch=epoch, train=True, cfg=cfg,
                                 pin_memory=dev.type == "cuda", raw=on_device)
            return DeviceBatches(loader, dev, head, cfg) if on_device else loader

        def step(xb, yb):
            _train_step(model, opt, xb.to(dev, non_blocking=True), yb.to(head, non_blocking=True))

        with precision(mode, dev.type):
            x = torch.randn(batch, 3, 224, 224, device=dev) * 60
            y = torch.randint(0, 10, (batch,), device=head)
            for _ in range(2):
                _train_step(model, opt, x, y)
            steps = 10
            on_device = _timed(lambda: [_train_step(model, opt, x, y) for _ in range(steps)], sync) / steps
            # Each worker's first batch of an epoch carries its start-up: untimed.
            rates = {path: _rate((epoch_batches(e, path == "device") for e in range(epochs)), step, sync,
                                 skip=workers) for path in ("device", "cpu")}
        loop = train_loop_rate(cache, model.devices, batch, mode, workers)
    on_dev_ips = batch / on_device
    return {"device": str(dev), "precision": mode, "batch": batch, "workers": workers,
            "images": 10 * per_class, "epochs": epochs,
            "train_images_per_s_on_device_batches": on_dev_ips,
            "train_images_per_s_device_input": rates["device"],
            "train_images_per_s_cpu_input": rates["cpu"],
            "device_input_over_on_device": rates["device"] / on_dev_ips,
            "cpu_input_over_on_device": rates["cpu"] / on_dev_ips,
            "train_loop_images_per_s": loop,
            "train_loop_over_on_device": loop / on_dev_ips}


def train_loop_rate(cache, devices, batch: int, mode: str, workers: int) -> float:
    """Images/s of `splitnet train` itself (train.train: the input path of its config, dropout
    streams, loss and error read back every step, metrics) on a prepared cache: one run of an
    epoch's batches less one, timed by the wall clock of its metrics records after the first
    `workers + 2` steps (worker start-up, cuDNN's first calls). No evaluation, one checkpoint at
    the end (outside the timed records)."""
    steps = len(PackedDataset(cache, "train")) // batch - 1
    skip = workers + 2
    if steps < skip + 2:
        raise ValueError(f"train_loop_rate: {steps} steps of {batch} in {cache}; need {skip + 2}")
    sets = [f'data.root="{cache}"', f"batch_size={batch}", f"max_steps={steps}", "eval_at_stop=false",
            f'precision="{mode}"', f"devices={json.dumps([str(d) for d in devices])}", f"data.workers={workers}"]
    with tempfile.TemporaryDirectory(prefix="splitnet-bench-") as tmp:
        train(load_config(None, sets), Path(tmp) / "run", progress=False)
        recs = [r for r in read_metrics(Path(tmp) / "run") if r["kind"] == "train"][skip:]
    return batch * (len(recs) - 1) / (recs[-1]["time"] - recs[0]["time"])


def distributed_vs_single(batch: int = 32, steps: int = 4) -> dict:
    """Run bench/dist.py in one process and under torchrun with 2 ranks (gloo on the CPU)."""
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


# The goals: (section, key, comparison, target, what it means)
GOALS = (
    ("cpu", "train_ratio_split_over_grouped", "<=", 1.05, "CPU: split training step over grouped"),
    ("cpu", "train_mfu", ">=", 0.45, "CPU: model FLOP utilisation of the measured fp32 matmul peak"),
    ("data", "cached_over_decode", ">=", 10.0, "data: cached path over decoding, per core"),
    ("data", "one_worker_over_train_step", ">=", 3.0, "data: one worker's supply over the CPU step's use"),
    ("cuda_bf16", "train_images_per_s_split", ">=", 15000.0, "GPU: bf16 training images/s, batches on the GPU"),
    ("cuda_bf16", "train_ratio_split_over_grouped", "<=", 1.10, "GPU: both columns on one GPU over grouped"),
    ("cuda_input", "train_loop_over_on_device", ">=", 0.8, "GPU: splitnet train from the cache over on-GPU batches"),
)


def goals(res: dict) -> list:
    """Each goal with its measured value and whether it is met (None: not measured in this run)."""
    out = []
    for section, key, op, target, what in GOALS:
        value = res.get(section, {}).get(key)
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out.append({"goal": what, "key": f"{section}.{key}", "target": f"{op} {target:g}", "value": value, "met": met})
    return out


def _print(res: dict) -> None:
    for place, r in res.items():
        if not isinstance(r, dict) or "train_ratio_split_over_grouped" not in r:
            continue
        print(f"\n[{place}] layout={r['layout']} batch={r['batch']} reps={r['reps']} precision={r['precision']} "
              f"devices={r['device']} (grouped on {r['grouped_device']})")
        print(f"  {'':<10}{'net':<28}{'step s':>9}{'/grouped':>10}{'img/s':>10}")
        for mode, key in (("train", "train_step_s"), ("inference", "infer_s")):
            g = r[f"{key}_grouped"]
            for st in r["strategies"]:
                s = r[f"{key}_split_{st}"]
                tag = " (default)" if st == r["default_strategy"] else ""
                print(f"  {mode:<10}{'split ' + st + tag:<28}{s:>9.3f}{s / g:>10.3f}{r['batch'] / s:>10.1f}")
            print(f"  {mode:<10}{'grouped':<28}{g:>9.3f}{1:>10.3f}{r['batch'] / g:>10.1f}")
            for name in ("split_sequential_compiled", "grouped_compiled"):
                if f"{key}_{name}" in r:
                    c = r[f"{key}_{name}"]
                    print(f"  {mode:<10}{name.replace('_', ' '):<28}{c:>9.3f}{c / g:>10.3f}{r['batch'] / c:>10.1f}")
        print(f"  {r['matmul_peak_dtype']} matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s, "
              f"training model FLOP utilisation {100 * r['train_mfu']:.1f}% (split, {r['default_strategy']})")
    for name, o in res.get("overlap", {}).items():
        print(f"\n[overlap {name}] {o['strategy']}: the columns ({o['kind']}) are busy together "
              f"{100 * o['overlap']:.0f}% of the time any is busy ({o['both_s']:.3f} of {o['busy_s']:.3f} s)")
    d = res.get("cuda_input")
    if d:
        print(f"\n[input path, {d['device']}, {d['precision']}, {d['workers']} workers] training from the uint8 cache: "
              f"device input {d['train_images_per_s_device_input']:.0f} img/s "
              f"({100 * d['device_input_over_on_device']:.0f}% of {d['train_images_per_s_on_device_batches']:.0f} "
              f"img/s on batches already there), CPU input {d['train_images_per_s_cpu_input']:.0f} img/s "
              f"({100 * d['cpu_input_over_on_device']:.0f}%); splitnet train {d['train_loop_images_per_s']:.0f} "
              f"img/s ({100 * d['train_loop_over_on_device']:.0f}%)")
    _print_data(res)
    print("\n[goals]")
    for g in res.get("goals", []):
        v = "not measured" if g["value"] is None else f"{g['value']:.3g}"
        tag = {True: "met", False: "NOT MET", None: "-"}[g["met"]]
        print(f"  {g['goal']:<62}{g['target']:>10}  {v:>12}  {tag}")


def _print_data(res: dict) -> None:
    d = res.get("data")
    if d:
        print(f"\n[data] decode {d['decode_images_per_s_per_core']:.0f} img/s/core; cached path "
              f"{d['cached_images_per_s_per_core']:.0f} img/s/core (x{d['cached_over_decode']:.1f} decode); "
              f"one worker {d['one_worker_images_per_s']:.0f} img/s"
              + (f" (x{d['one_worker_over_train_step']:.1f} the CPU training step's "
                 f"{d['train_step_images_per_s']:.1f} img/s)" if "one_worker_over_train_step" in d else ""))


def run(placements=None, layout="paper", batch=128, reps=3, data: bool = True, precisions=None,
        overlap: bool = True, trace_dir=None, compile_backend: str | None = None) -> dict:
    """Every section for the placements asked (default: cpu, plus cuda / cuda2 for the GPUs present).

    cpu    the CPU emulation, fp32
    cuda   both columns on cuda:0, once per precision (default fp32, tf32, bf16, bf16_cl);
           sections "cuda" (fp32) and "cuda_<precision>"
    cuda2  columns on cuda:0 and cuda:1 against the grouped network on cuda:0 (bf16), and both
           columns on cuda:0 in the same run ("cuda2_one_gpu")
    """
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if placements is None:
        placements = ["cpu"] + (["cuda"] if ngpu else []) + (["cuda2"] if ngpu >= 2 else [])
    res = {"host": {"python": sys.version.split()[0], "torch": torch.__version__,
                    "machine": platform.machine(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if ngpu else None, "gpus": ngpu}}
    overlaps = {}
    for place in placements:
        if place not in ("cpu", "cuda", "cuda2"):
            raise ValueError(f"unknown placement {place!r} (cpu, cuda, cuda2)")
        if place.startswith("cuda") and ngpu < (2 if place == "cuda2" else 1):
            raise DeviceError(f"placement {place!r} asked for, but only {ngpu} CUDA device(s) are present")
        if place == "cpu":
            res["cpu"] = compare(layout, "cpu", batch, reps, compile_backend=compile_backend)
        elif place == "cuda":
            for mode in precisions or tuple(PRECISIONS):
                res["cuda" if mode == "fp32" else f"cuda_{mode}"] = compare(layout, "cuda:0", batch, reps, mode=mode,
                                                                           compile_backend=compile_backend)
        else:
            mode = (precisions or ("bf16",))[-1]
            res["cuda2"] = compare(layout, ("cuda:0", "cuda:1"), batch, reps, mode=mode, baseline_device="cuda:0")
            res["cuda2_one_gpu"] = compare(layout, "cuda:0", batch, reps, mode=mode, strategies=["sequential"])
            res["cuda2"]["train_ratio_two_gpus_over_one"] = (res["cuda2"]["train_step_s_split"]
                                                             / res["cuda2_one_gpu"]["train_step_s_split"])
        if overlap:
            overlaps.update(_overlaps(place, layout, min(batch, 32), trace_dir))
        if place == "cuda" and data:
            res["cuda_input"] = input_path("cuda:0", batch)
    if overlaps:
        res["overlap"] = overlaps
    if data:
        res["data"] = data_path(batch, res.get("cpu", {}).get("train_images_per_s_split"))
    return res


def _overlaps(place: str, layout: str, batch: int, trace_dir) -> dict:
    """Profiler-measured overlap of the columns for the placement's concurrent strategies."""
    cases = {"cpu": [("cpu_threads", "cpu", "threads")],
             "cuda": [("cuda_streams", "cuda:0", "streams"), ("cuda_sequential", "cuda:0", "sequential")],
             "cuda2": [("cuda2", ("cuda:0", "cuda:1"), "sequential")]}[place]
    out = {}
    for name, devs, st in cases:
        torch.manual_seed(0)
        m = SplitAlexNet(1000, layout, devices=devs, concurrency=st)
        x = torch.randn(batch, 3, m.input_side, m.input_side, device=m.devices[0]) * 60
        trace = str(Path(trace_dir) / f"trace_{name}.json") if trace_dir else None
        with precision("bf16" if place != "cpu" else "fp32", m.devices[0].type):
            out[name] = column_overlap(m, x, steps=3, trace=trace)
    return out


def _main(args) -> int:
    res = run(args.placements, args.layout, args.batch, args.reps, not args.no_data, args.precisions,
              not args.no_overlap, args.traces, args.compile)
    if args.distributed:
        res["distributed"] = distributed_vs_single(batch=min(args.batch, 32))
        d = res["distributed"]
        print(f"\n[distributed] batch {d['batch']}: 2 gloo ranks {d['ranks2_step_s']:.3f} s/step vs one process "
              f"{d['single_step_s']:.3f} s/step (ratio {d['ratio_ranks2_over_single']:.2f}); exchange time share: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in d["exchange_share"].items()))
    res["goals"] = goals(res)
    _print(res)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {out}")
    return 0
