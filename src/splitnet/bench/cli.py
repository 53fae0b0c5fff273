"""`splitnet bench`: the split model against its single-device grouped equivalent, side by side.

Everything is measured in one process, in one run, interleaved (matmul sample, split step, matmul
sample, grouped step, ...), and reported as ratios with their spread over the rounds, because
absolute timings on shared machines are noise. JSON sections:

  cpu            the CPU emulation (both columns on the CPU), fp32
  cuda           both columns on cuda:0, fp32 (TF32 off); cuda_tf32, cuda_bf16 (autocast),
                 cuda_bf16_cl (bf16 + channels_last): the same for each numeric mode
  cuda2          columns on cuda:0 and cuda:1 (bf16) vs the grouped network on cuda:0;
                 cuda2_one_gpu: both columns on cuda:0 in the same run
Keys of each section (a "<key>_spread" is {median, min, max, n} over the rounds):
  train_step_s_split / _grouped   median seconds of one training step as `splitnet train` takes it
                                  (timing.train_step: dropout masks, forward, cross entropy, backward,
                                  PaperSGD update) at --batch; "split" is the default strategy
  train_step_s_split_<strategy>   the same per concurrency strategy timed (model/concurrent.py): threads and
                                  sequential on the CPU, sequential and streams on one GPU
  default_strategy, best_strategy what training would run (CPU: the rule in concurrent.choose; one GPU:
                                  tune.calibrate's pick, as training calibrates), and what was fastest here
  train_ratio_split_over_grouped  median over rounds of (split step / grouped step of the same round),
                                  with _spread (goal <= 1.05 on the CPU, <= 1.10 on one GPU);
                                  train_ratio_split_<strategy>_over_grouped
  infer_ratio_split_over_grouped  the same for an eval-mode forward pass without grad
  train_images_per_s_split (+ _spread), train_images_per_s_grouped, infer_images_per_s_split
  train_flops_per_image           FLOPs of one image's training step as computed (layout.py
                                  Layout.train_flops_per_image: forward, weight gradients, input gradients
                                  but conv1's; a multiply-add = 2 FLOPs); paper layout 4.14e9
  peak_flops_measured             FLOP/s: the best of the matmul samples taken between the timed steps
                                  (peak.MatmulPeak; all of them in peak_flops_measured_samples), in
                                  peak_flops_measured_dtype (fp32 on the CPU; the mode's dtype on a GPU)
  peak_flops_nominal (+ _basis)   FLOP/s the devices are rated for: CPU cores x fp32 FLOP/cycle of the
                                  vector ISA (2 FMA units a core assumed) x clock; GPU datasheet dense
                                  figure for the precision, summed over the GPUs; null for an unknown card
  train_util_of_measured, train_util_of_nominal   train_flops_per_image x train_images_per_s_split over
                                  each peak, fractions, with _spread (goal: measured >= 0.45 on the CPU)
  cuda2.train_ratio_two_gpus_over_one   split across two GPUs over both columns on one
  cuda_input                      training images/s fed from the uint8 cache: device_input (augmented on
                                  the GPU, data/device_input.py) and cpu_input (augmented by the
                                  workers), each over train_images_per_s_on_device_batches;
                                  train_loop: `splitnet train` itself (train_loop_rate), the goal's
                                  figure: train_loop_over_on_device >= 0.8 (_spread: thirds of the run)
  cpu_bf16                        bf16 against fp32 on this CPU (bench/cpu_bf16.py): cpu_flags (avx2,
                                  avx512f, avx512_bf16, amx_*), and for the full network (fp32 vs bf16,
                                  batch 8) and the CIFAR-scale one (fp32_cl vs bf16_cl, batch 128) the
                                  step times and ratio = bf16 step / fp32 step per interleaved round
  overlap.<case>                  profiler-measured concurrency of the columns: busy_s (time any
                                  column works), both_s (time two or more do), overlap = both / busy;
                                  cases cpu_threads, cuda_streams, cuda_sequential, cuda2

  data.decode_images_per_s_per_core     preparation: JPEG decode + rescale + centre crop, one process
  data.cached_images_per_s_per_core     training input from the cache (crop, flip, lighting, mean),
                                        in-process, one thread
  data.one_worker_images_per_s          the same through one DataLoader worker process (each epoch's
                                        first batch, when the worker starts, untimed)
  data.cached_over_decode               goal >= 10 (_spread over 3 epochs)
  data.workers_for_gpu_goal             information: DataLoader workers (at one worker's rate) that
                                        feeding the GPU goal's 15,000 images/s needs; and
                                        workers_for_measured_gpu for the cuda_bf16 rate measured here

Goals are judged with their noise (`judge`): "met" only if the worst round meets the target,
"not met" if even the best round misses it, else "not resolved"; fewer than 3 rounds: "not resolved".
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

from ..formatting import pct
from ..model.columns import SplitAlexNet
from ..model.placement import DeviceError
from ..model.precision import PRECISIONS, precision
from .cpu_bf16 import bf16_vs_fp32
from .data import data_path, input_path
from .dist import distributed_vs_single
from .model import column_overlap, compare

# The GPU modes timed unless --precisions says otherwise; fp16 / fp16_cl (for GPUs without bf16) on request.
DEFAULT_PRECISIONS = ("fp32", "tf32", "bf16", "bf16_cl")


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed of the split model vs the single-device grouped network")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5,
                   help="rounds: one timed step per model each, a matmul sample before each step (after one "
                        "warm-up); goals are judged from 3")
    p.add_argument("--layout", default="paper")
    p.add_argument("--placements", nargs="*", default=None, choices=["cpu", "cuda", "cuda2"],
                   help="cpu, cuda (both columns on cuda:0), cuda2 (cuda:0 + cuda:1); default: what exists")
    p.add_argument("--no-data", action="store_true", help="skip the data path measurement")
    p.add_argument("--precisions", nargs="*", default=None, choices=list(PRECISIONS),
                   help="GPU numeric modes to time (default: fp32 tf32 bf16 bf16_cl)")
    p.add_argument("--no-overlap", action="store_true", help="skip the profiler's overlap measurement")
    p.add_argument("--traces", default=None, help="keep the profiler's Chrome traces in this folder")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time torch.compile'd sequential split and grouped networks (default backend inductor)")
    p.add_argument("--distributed", action="store_true",
                   help="also: 2 gloo ranks under torchrun vs one process (bench/dist.py)")
    p.set_defaults(func=_main)


GPU_GOAL_IMAGES_PER_S = 15000.0  # bf16 training on one GPU, batches already there
# The goals: (section, key, comparison, target, what it means). Each can fail on the
# machine that measures it.
GOALS = (
    ("cpu", "train_ratio_split_over_grouped", "<=", 1.05, "CPU: split training step over grouped"),
    ("cpu", "train_util_of_measured", ">=", 0.45, "CPU: training FLOP/s over the measured fp32 matmul peak"),
    ("data", "cached_over_decode", ">=", 10.0, "data: cached path over decoding, per core"),
    ("cuda_bf16", "train_images_per_s_split", ">=", GPU_GOAL_IMAGES_PER_S,
     "GPU: bf16 training images/s, batches on the GPU"),
    ("cuda_bf16", "train_ratio_split_over_grouped", "<=", 1.10, "GPU: both columns on one GPU over grouped"),
    ("cuda_input", "train_loop_over_on_device", ">=", 0.8, "GPU: splitnet train from the cache over on-GPU batches"),
    ("distributed", "ratio_overlap_over_flat", "<=", 1.0,
     "torchrun, 2 replicas x 2 columns: gradient all-reduce overlapped with backward over one flat all-reduce"),
)
MIN_ROUNDS = 3  # fewer repetitions show no spread to judge against


def judge(op: str, target: float, value, spread: dict | None) -> str:
    """"met" if the worst repetition meets the target, "not met" if even the best misses it,
    "not resolved" in between or with fewer than MIN_ROUNDS repetitions; "not measured" without a value.
    With a confidence interval of the median (spread["ci95"], from 6 repetitions on) its ends take the
    place of the worst and best repetitions: many repetitions make the extremes wider, not the
    median's uncertainty."""
    if value is None:
        return "not measured"
    if not spread or spread["n"] < MIN_ROUNDS:
        return "not resolved"
    meets = (lambda v: v <= target) if op == "<=" else (lambda v: v >= target)
    lo, hi = spread.get("ci95") or (spread["min"], spread["max"])
    worst, best = (hi, lo) if op == "<=" else (lo, hi)
    return "met" if meets(worst) else ("not met" if not meets(best) else "not resolved")


def goals(res: dict) -> list:
    """Each goal with its measured value, its spread over repetitions and the verdict of `judge`
    (met: True / False, None when not resolved or not measured)."""
    out = []
    for section, key, op, target, what in GOALS:
        sec = res.get(section, {})
        value, spread = sec.get(key), sec.get(f"{key}_spread")
        verdict = judge(op, target, value, spread)
        out.append({"goal": what, "key": f"{section}.{key}", "target": f"{op} {target:g}", "value": value,
                    "spread": [spread["min"], spread["max"]] if spread else None,
                    "ci95": spread.get("ci95") if spread else None,
                    "rounds": spread["n"] if spread else None, "verdict": verdict,
                    "met": {"met": True, "not met": False}.get(verdict)})
    return out


def information(res: dict) -> list:
    """Figures that are not goals, as lines: what feeding a GPU asks of the data workers."""
    d, lines = res.get("data"), []
    if d and d.get("one_worker_images_per_s"):
        lines.append(f"feeding a GPU at the goal's {GPU_GOAL_IMAGES_PER_S:,.0f} images/s takes "
                     f"{d['workers_for_gpu_goal']:.1f} DataLoader workers at one worker's "
                     f"{d['one_worker_images_per_s']:.0f} images/s measured here")
        if "workers_for_measured_gpu" in d:
            lines.append(f"the bf16 rate measured here ({res['cuda_bf16']['train_images_per_s_split']:,.0f} "
                         f"images/s) takes {d['workers_for_measured_gpu']:.1f} such workers")
    return lines


def _print(res: dict) -> None:
    for place, r in res.items():
        if isinstance(r, dict) and "train_ratio_split_over_grouped" in r:
            _print_section(place, r)
    for name, o in res.get("overlap", {}).items():
        print(f"\n[overlap {name}] {o['strategy']}: the columns ({o['kind']}) are busy together "
              f"{100 * o['overlap']:.0f}% of the time any is busy ({o['both_s']:.3f} of {o['busy_s']:.3f} s)")
    b = res.get("cpu_bf16")
    if b:
        print(f"\n[cpu bf16] flags {' '.join(b['cpu_flags']) or 'none found'}: a bf16 training step takes "
              + "; ".join(f"{_range_x(b[g]['ratio'])} of fp32's ({g}, batch {b[g]['batch']})" for g in ("imagenet", "cifar")
                          if g in b)
              + " (below 1: bf16 pays on this CPU)")
    d = res.get("cuda_input")
    if d:
        print(f"\n[input path, {d['device']}, {d['precision']}, {d['workers']} workers] training from the uint8 cache: "
              f"device input {d['train_images_per_s_device_input']:.0f} img/s "
              f"({100 * d['device_input_over_on_device']:.0f}% of {d['train_images_per_s_on_device_batches']:.0f} "
              f"img/s on batches already there), CPU input {d['train_images_per_s_cpu_input']:.0f} img/s "
              f"({100 * d['cpu_input_over_on_device']:.0f}%); splitnet train {d['train_loop_images_per_s']:.0f} "
              f"img/s ({100 * d['train_loop_over_on_device']:.0f}%)")
    _print_data(res)
    info = information(res)
    if info:
        print("\n[information]")
        for line in info:
            print(f"  {line}")
    print("\n[goals]  met: the worst round meets it; not met: even the best round misses it (from 6 rounds"
          " on: the ends of the median's 95% CI, shown in [])")
    for g in res.get("goals", []):
        v = "not measured" if g["value"] is None else f"{g['value']:.3g}"
        rng = f"[{_interval(g['ci95'])}]" if g.get("ci95") else (_interval(g["spread"]) if g["spread"] else "")
        verdict = g["verdict"].upper() if g["met"] is False else g["verdict"]
        print(f"  {g['goal']:<58}{g['target']:>9}  {v:>12} {rng:>14}  {verdict}")


def _range_x(spread: dict) -> str:
    return f"{spread['median']:.2f}x ({spread['min']:.2f}..{spread['max']:.2f})"


def _interval(ci) -> str:
    return f"{ci[0]:.3g}..{ci[1]:.3g}" if ci else "-"


def _range(spread: dict | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    return f"{scale * spread['min']:{fmt}}..{scale * spread['max']:{fmt}}" if spread else "-"


def _print_section(place: str, r: dict) -> None:
    print(f"\n[{place}] layout={r['layout']} batch={r['batch']} reps={r['reps']} precision={r['precision']} "
          f"devices={r['device']} (grouped on {r['grouped_device']})")
    print(f"  {'':<10}{'net':<28}{'step s':>9}{'/grouped':>10}{'img/s':>10}")
    for mode, key in (("train", "train_step_s"), ("inference", "infer_s")):
        g = r[f"{key}_grouped"]
        short = "train" if mode == "train" else "infer"
        for st in r["strategies"]:
            s = r[f"{key}_split_{st}"]
            tag = " (default)" if st == r["default_strategy"] else ""
            print(f"  {mode:<10}{'split ' + st + tag:<28}{s:>9.3f}"
                  f"{r[f'{short}_ratio_split_{st}_over_grouped']:>10.3f}{r['batch'] / s:>10.1f}")
        print(f"  {mode:<10}{'grouped':<28}{g:>9.3f}{1:>10.3f}{r['batch'] / g:>10.1f}")
        for name in ("split_sequential_compiled", "grouped_compiled"):
            if f"{key}_{name}" in r:
                c = r[f"{key}_{name}"]
                print(f"  {mode:<10}{name.replace('_', ' '):<28}{c:>9.3f}"
                      f"{r[f'{short}_ratio_{name}_over_grouped']:>10.3f}{r['batch'] / c:>10.1f}")
        print(f"  {mode} split/grouped {r[f'{short}_ratio_split_over_grouped']:.3f}, median of {r['reps']} "
              f"round(s), range {_range(r[f'{short}_ratio_split_over_grouped_spread'])}")
    print(f"  training FLOPs per image {r['train_flops_per_image'] / 1e9:.3f} G (forward, weight and input "
          f"gradients, none for the image; layout {r['layout']})")
    print(f"  utilisation of the measured {r['peak_flops_measured_dtype']} matmul peak "
          f"({r['peak_flops_measured'] / 1e9:,.1f} GFLOP/s, sampled between the steps): "
          f"{pct(r['train_util_of_measured'])} (rounds {_range(r['train_util_of_measured_spread'], '.1f', 100)}%)")
    nominal = r["peak_flops_nominal"]
    print(f"  utilisation of the nominal peak ({'-' if nominal is None else f'{nominal / 1e9:,.1f}'} GFLOP/s: "
          f"{r['peak_flops_nominal_basis']}): {pct(r['train_util_of_nominal'])}"
          + (f" (rounds {_range(r['train_util_of_nominal_spread'], '.1f', 100)}%)" if nominal else ""))


def _print_data(res: dict) -> None:
    d = res.get("data")
    if d:
        print(f"\n[data] decode {d['decode_images_per_s_per_core']:.0f} img/s/core; cached path "
              f"{d['cached_images_per_s_per_core']:.0f} img/s/core (x{d['cached_over_decode']:.1f} decode, "
              f"epochs {_range(d['cached_over_decode_spread'], '.1f')}); "
              f"one worker {d['one_worker_images_per_s']:.0f} img/s")


def _gpu_feed(res: dict) -> None:
    """data.workers_for_gpu_goal (and _for_measured_gpu): information, not a goal."""
    d = res.get("data")
    if not d or not d.get("one_worker_images_per_s"):
        return
    d["workers_for_gpu_goal"] = GPU_GOAL_IMAGES_PER_S / d["one_worker_images_per_s"]
    if "cuda_bf16" in res:
        d["workers_for_measured_gpu"] = res["cuda_bf16"]["train_images_per_s_split"] / d["one_worker_images_per_s"]


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
            res["cpu_bf16"] = bf16_vs_fp32(min(8, batch), reps, cifar_batch=batch)
        elif place == "cuda":
            for mode in precisions or DEFAULT_PRECISIONS:
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
        res["data"] = data_path(batch)
        _gpu_feed(res)
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
        r = d["ranks4_reduce"]
        q = r["ratio_overlap_over_flat"]
        d["ratio_overlap_over_flat"], d["ratio_overlap_over_flat_spread"] = q["median"], q  # judged in goals()
        print(f"[distributed] 4 gloo ranks (2 replicas x 2 columns): gradient all-reduce overlapped with backward "
              f"({r['buckets']} buckets) {r['overlap_step_s']:.3f} s/step vs one flat all-reduce after backward "
              f"{r['flat_step_s']:.3f} s/step: ratio {q['median']:.3f} (median of {q['n']} interleaved pairs, "
              f"{q['min']:.3f}..{q['max']:.3f}; 95% CI of the median {_interval(q.get('ci95'))}; "
              f"overlap faster in {r['overlap_faster_pairs']} of {q['n']})")
        for s_ in d["ranks4_sent"]:
            print(f"[distributed] rank {s_['rank']} (replica {s_['replica']}, column {s_['column']}) sends per step: "
                  + ", ".join(f"{k} {s_['sent'].get(k, 0) / 1e6:.3f} MB (layout: {v / 1e6:.3f} MB)"
                              for k, v in s_["expected"].items()))
    res["goals"] = goals(res)
    _print(res)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {out}")
    return 0
