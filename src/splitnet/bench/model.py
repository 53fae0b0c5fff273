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

from ..compat import profile_all_threads
from ..model.columns import SplitAlexNet
from ..model.grouped import GroupedAlexNet
from ..model.layout import get_layout
from ..model.placement import synchronize
from ..model.precision import PRECISIONS, autocast, autocast_dtype, memory_format, numerics
from .peak import MatmulPeak, nominal_peak
from .timing import paper_optimizer, spread, timed, train_step, training_strategy


def strategies_for(devices) -> list:
    """The concurrency strategies worth timing for a placement (model/concurrent.py)."""
    devs = [torch.device(d) for d in devices]
    if all(d.type == "cpu" for d in devs):
        return ["threads", "sequential"]
    if len(set(devs)) == 1:
        return ["sequential", "streams"]
    return ["sequential"]


def _nets(layout, devices, base, num_classes: int, strategies, compile_backend, geometry: str) -> dict:
    """{name: net}, every one with the same weights: split_<strategy> per strategy, grouped (on
    `base`), and with compile_backend the compiled sequential split and grouped networks."""
    torch.manual_seed(0)
    nets = {}
    for st in strategies:
        nets[f"split_{st}"] = SplitAlexNet(num_classes, layout, devices=devices, concurrency=st, geometry=geometry)
        if st != strategies[0]:
            nets[f"split_{st}"].load_state_dict(nets[f"split_{strategies[0]}"].state_dict())
    first = nets[f"split_{strategies[0]}"]
    grouped = GroupedAlexNet(first.config).to(base)
    grouped.load_state_dict(first.grouped_state_dict())
    nets["grouped"] = grouped
    if compile_backend:
        seq = SplitAlexNet(num_classes, layout, devices=devices, concurrency="sequential", geometry=geometry)
        seq.load_state_dict(first.state_dict())
        g2 = GroupedAlexNet(first.config).to(base)
        g2.load_state_dict(first.grouped_state_dict())
        nets["split_sequential_compiled"] = torch.compile(seq, backend=compile_backend)
        nets["grouped_compiled"] = torch.compile(g2, backend=compile_backend)
    return nets


def compare(layout: str = "paper", device="cpu", batch: int = 128, reps: int = 3,
            num_classes: int = 1000, mode: str = "fp32", strategies=None, baseline_device=None,
            compile_backend: str | None = None, geometry: str = "imagenet") -> dict:
    """Training step and inference of the split model (each concurrency strategy) against the
    single-device grouped network, interleaved in one process, and the split's training FLOP
    utilisation of the devices.

    Each of `reps` rounds takes, net after net, a matmul sample (peak.MatmulPeak) and one training
    step (timing.train_step: PaperSGD, the run's dropout, train mode): matmul, split, matmul,
    grouped, ... so the measured peak shares the steps' conditions. Ratios are taken within a round
    (a split step over the grouped step next to it) and reported with their spread over the rounds.
    The headline "split" runs the strategy training would pick (timing.training_strategy).

    device: one device for every column, or one per column (two GPUs). The grouped network runs on
    `baseline_device` (default: the first column's device). mode: a key of PRECISIONS.
    compile_backend: also time torch.compile(backend=...) of the sequential split model and of the
    grouped network ("split_sequential_compiled", "grouped_compiled"). The threads strategy is not
    compiled (its columns run in worker threads). geometry: the paper's network ("imagenet") or its
    CIFAR-scale family ("cifar", model/layout.py)."""
    ncol = get_layout(layout, num_classes, geometry).columns
    devices = tuple(torch.device(d) for d in (device if isinstance(device, (tuple, list)) else (device,) * ncol))
    base = torch.device(baseline_device) if baseline_device else devices[0]
    strategies = strategies or strategies_for(devices)
    nets = _nets(layout, devices, base, num_classes, strategies, compile_backend, geometry)
    first = nets[f"split_{strategies[0]}"]
    xs = _inputs(nets, batch, num_classes, first, memory_format(mode), devices, base)
    default = training_strategy(first, batch, mode)  # after the memory format, as training calibrates
    split = f"split_{default}" if default in strategies else f"split_{strategies[0]}"
    peak = MatmulPeak(devices, autocast_dtype(mode) or torch.float32)
    dev_type = devices[0].type
    times = _time_rounds(nets, xs, sorted(set(devices) | {base}, key=str), peak, reps, mode, dev_type)
    res = {"device": ", ".join(str(d) for d in devices), "grouped_device": str(base), "layout": layout,
           "geometry": geometry,
           "batch": batch, "reps": reps, "precision": mode,
           "default_strategy": split[len("split_"):], "strategies": strategies}
    res.update(_step_figures(times, split, batch))
    res["best_strategy"] = min(strategies, key=lambda st: res[f"train_step_s_split_{st}"])
    res.update(_utilisation(first.layout.train_flops_per_image(), times[f"train_{split}"], batch, peak,
                            nominal_peak(devices, mode), mode, dev_type))
    if compile_backend:
        res["compile_backend"] = compile_backend
    res["all_times_s"] = times
    return res


def _inputs(nets: dict, batch: int, num_classes: int, first, fmt, devices, base) -> dict:
    """{name: (x, y)}: one random batch on each net's devices (the grouped ones' on `base`), in the
    memory format `fmt`, which each net is also put in."""
    x = torch.randn(batch, 3, first.input_side, first.input_side) * 60
    y = torch.randint(0, num_classes, (batch,))
    xs = {}
    for name, net in nets.items():
        net.to(memory_format=fmt)
        on_base = name.startswith("grouped")
        xs[name] = (x.to(base if on_base else devices[0]).contiguous(memory_format=fmt),
                    y.to(base if on_base else devices[first.layout.head]))
    return xs


def _time_rounds(nets: dict, xs: dict, sync, peak: MatmulPeak, reps: int, mode: str, dev_type: str) -> dict:
    """{"train_<net>": [s, ...], "infer_<net>": [s, ...]}: after a warm-up, `reps` rounds of a matmul
    sample and a training step, net after net; then a warm-up and `reps` rounds of inference."""
    opts = {k: paper_optimizer(n) for k, n in nets.items()}
    times = {f"{m}_{k}": [] for m in ("train", "infer") for k in nets}
    with numerics(mode):
        for name, net in nets.items():  # warm-up: allocator, oneDNN/cuDNN algorithm choice
            net.train()
            train_step(net, opts[name], *xs[name], step=0, mode=mode)
        peak.sample()
        peak.samples.clear()
        for r in range(reps):
            for name, net in nets.items():
                peak.sample()
                times[f"train_{name}"].append(timed(
                    lambda: train_step(net, opts[name], *xs[name], step=1 + r, mode=mode), sync))
        with torch.no_grad(), autocast(mode, dev_type):
            for name, net in nets.items():
                net.eval()
                net(xs[name][0])
            for _ in range(reps):
                for name, net in nets.items():
                    times[f"infer_{name}"].append(timed(lambda: net(xs[name][0]), sync))
    return times


def _paired(num: list, den: list) -> dict:
    """Spread of num[r] / den[r] over the rounds r (each pair timed next to each other)."""
    return spread(a / b for a, b in zip(num, den))


def _step_figures(times: dict, split: str, batch: int) -> dict:
    """Medians, images/s and split-over-grouped ratios (median of the rounds' ratios, with spread)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {}
    for mode, key in (("train", "train_step_s"), ("infer", "infer_s")):
        g = times[f"{mode}_grouped"]
        out[f"{key}_split"], out[f"{key}_grouped"] = med[f"{mode}_{split}"], med[f"{mode}_grouped"]
        ratio = _paired(times[f"{mode}_{split}"], g)
        out[f"{mode}_ratio_split_over_grouped"] = ratio["median"]
        out[f"{mode}_ratio_split_over_grouped_spread"] = ratio
        for name in times:
            if name.startswith(f"{mode}_split_") or name == f"{mode}_grouped_compiled":
                net = name[len(mode) + 1:]
                out[f"{key}_{net}"] = med[name]
                out[f"{mode}_ratio_{net}_over_grouped"] = _paired(times[name], g)["median"]
    out["train_images_per_s_split"] = batch / med[f"train_{split}"]
    out["train_images_per_s_split_spread"] = spread(batch / t for t in times[f"train_{split}"])
    out["train_images_per_s_grouped"] = batch / med["train_grouped"]
    out["infer_images_per_s_split"] = batch / med[f"infer_{split}"]
    return out


def _utilisation(flops: int, steps_s: list, batch: int, peak: MatmulPeak, nominal: dict, mode: str,
                 dev_type: str) -> dict:
    """Training FLOPs per second of the split (layout.train_flops_per_image x images/s) over the
    measured matmul peak and over the nominal peak, as fractions, each with its spread over rounds."""
    rate = batch / statistics.median(steps_s)
    out = {"train_flops_per_image": flops,
           "peak_flops_measured": peak.peak, "peak_flops_measured_samples": list(peak.samples),
           "peak_flops_measured_dtype": str(peak.dtype).replace("torch.", "")
           + ("+tf32" if PRECISIONS[mode][0] and peak.dtype == torch.float32 and dev_type == "cuda" else ""),
           "peak_flops_nominal": nominal.get("flops"), "peak_flops_nominal_basis": nominal.get("basis")}
    for name, denom in (("measured", peak.peak), ("nominal", nominal.get("flops"))):
        out[f"train_util_of_{name}"] = flops * rate / denom if denom else None
        out[f"train_util_of_{name}_spread"] = spread(flops * batch / t / denom for t in steps_s) if denom else None
    return out


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
        model.set_dropout_stream(0, x.shape[0])  # as training draws masks: no global-RNG ordering
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        synchronize(model.devices)

    step()  # warm-up outside the trace
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # the profiler records the calling thread only, unless told otherwise (torch >= 2.6)
    with profile(activities=acts, **profile_all_threads()) as prof:
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
