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

import json
import os
import platform
import sys
from pathlib import Path

import torch

from ..model.columns import SplitAlexNet
from ..model.placement import DeviceError
from ..model.precision import PRECISIONS, precision
from .data import data_path, input_path
from .dist import distributed_vs_single
from .model import column_overlap, compare


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
