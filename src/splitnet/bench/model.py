"""The split model against its single-device grouped equivalent, interleaved in one process
(`compare`), and how much its columns overlap in time (`column_overlap`, from the profiler's trace).
The JSON keys are listed in cli.py."""
from __future__ import annotations

import json
import re
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.columns import SplitAlexNet
from ..model.concurrent import choose
from ..model.grouped import GroupedAlexNet
from ..model.layout import get_layout
from ..model.placement import synchronize
from ..model.precision import PRECISIONS, autocast_dtype, memory_format, precision
from .timing import matmul_peak_gflops, timed, train_step


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
            train_step(net, opts[name], *xs[name])
        for _ in range(reps):
            for name, net in nets.items():
                times[f"train_{name}"].append(timed(lambda: train_step(net, opts[name], *xs[name]), sync))
        with torch.no_grad():
            for name, net in nets.items():
                net.eval()
                net(xs[name][0])
            for _ in range(reps):
                for name, net in nets.items():
                    times[f"infer_{name}"].append(timed(lambda: net(xs[name][0]), sync))
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
