"""The device check's measurements (experiments/gpu_check.sh): one GPU session, every figure the
README's GPU rows need, a few JSON files.

    python3 -m splitnet.bench.gpu_check env     --out env.json      card, driver, torch, cuDNN
    python3 -m splitnet.bench.gpu_check streams --out streams.json  streams against sequential
    python3 -m splitnet.bench.gpu_check speed   --out speed.json    training images/s
    ... --dry-run: the smallest sizes, on the CPU where no GPU is (the CPU tests run it)

Without a GPU, `env` still writes its file (cuda: false) and the others exit 2 with one line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys

import torch

from ..model.columns import Column, SplitAlexNet
from ..model.concurrent import reset_streams
from ..model.grouped import GroupedAlexNet
from ..model.placement import cudnn_autotune, synchronize
from ..model.precision import memory_format, precision
from .timing import paper_optimizer, spread, timed, train_step

SLEEP_CYCLES = 20_000_000  # ~10 ms on a 2 GHz GPU clock: longer than a column's segment at batch 32


def environment() -> dict:
    """The card, driver, torch, CUDA and cuDNN versions (cuda: false without a GPU)."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "cuda_version": torch.version.cuda, "cpu_count": __import__("os").cpu_count()}
    if env["cuda"]:
        env.update(devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   capability=list(torch.cuda.get_device_capability(0)),
                   cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["driver"] = f"nvidia-smi failed: {e}"
    return env


def _delayed_column(monkeypatch_column: int, cycles: int):
    """Column.run with `cycles` of GPU sleep queued before column `monkeypatch_column`'s every
    segment, on whatever stream it runs on: if an exchange read that column's maps without waiting
    for its stream, it would read them before they are written. Returns (install, remove)."""
    real = Column.run

    def run(self, steps, x):
        if self.index == monkeypatch_column and x is not None and x.is_cuda and cycles:
            torch.cuda._sleep(cycles)
        return real(self, steps, x)

    return (lambda: setattr(Column, "run", run)), (lambda: setattr(Column, "run", real))


def _step_result(model, x, y, mode: str) -> list:
    """Logits and every gradient of one forward/backward in `mode`, as float32 CPU tensors."""
    model.zero_grad(set_to_none=True)
    with precision(mode, x.device.type):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    synchronize(model.devices)
    return [logits.detach().float().cpu()] + [p.grad.float().cpu() for p in model.parameters()]


def _max_rel(a: list, b: list) -> float:
    return max(((u - v).norm() / v.norm().clamp_min(1e-30)).item() for u, v in zip(a, b))


@contextlib.contextmanager
def _deterministic_cudnn():
    """cuDNN's deterministic algorithms, no autotuning (restored after): sequential's run-to-run
    noise is then 0 and a missing wait shows as a difference, whatever an earlier test set."""
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


def _poison_freed_memory(device) -> None:
    """New column streams, and the GPU memory the last run freed filled with NaN: the caching
    allocator keeps a pool per stream, so a streams run after another would get blocks that already
    hold the right maps, and a read that does not wait would still see correct values. A heuristic
    (cudaMalloc may hand out other memory), but it only ever makes a missing wait more visible."""
    reset_streams()
    if torch.device(device).type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    n = min(torch.cuda.max_memory_reserved(device), int(0.8 * free)) // 4
    junk = torch.full((max(n, 1),), float("nan"), device=device)
    del junk
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def streams_vs_sequential(device="cuda:0", batch: int = 32, modes=("fp32", "bf16_cl"), cycles: int = SLEEP_CYCLES,
                          num_classes: int = 1000, geometry: str = "imagenet", emit=None) -> dict:
    """Both columns on one GPU: the streams strategy with column 1's work delayed (and then column
    0's) against sequential, per mode, with sequential's own run-to-run difference as the noise
    floor (cuDNN deterministic). Dropout is the run's (eval mode would hide nothing here, dropout
    streams are per column). Each streams run gets new streams and NaN-filled freed memory.
    ok: every streams run within max(4 x noise, 1e-6) of the first sequential run.
    emit(result so far), if given, after each mode (the device check writes its file each time)."""
    out = {"device": str(device), "batch": batch, "sleep_cycles": cycles, "modes": {}}
    with _deterministic_cudnn():
        for mode in modes:
            out["modes"][mode] = _streams_mode(device, batch, mode, cycles, num_classes, geometry)
            out["ok"] = all(m["ok"] for m in out["modes"].values())
            if emit:
                emit(out)
    return out


def _streams_mode(device, batch: int, mode: str, cycles: int, num_classes: int, geometry: str) -> dict:
    """One mode of streams_vs_sequential."""
    torch.manual_seed(0)
    fmt = memory_format(mode)
    ref_net = SplitAlexNet(num_classes, devices=(device, device), geometry=geometry,
                           concurrency="sequential").to(memory_format=fmt).train()
    x = (torch.randn(batch, 3, ref_net.input_side, ref_net.input_side) * 60).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device)
    runs = {}
    for name, strategy, delayed in (("sequential", "sequential", None), ("sequential_again", "sequential", None),
                                    ("streams_delay_col1", _concurrent(device), 1),
                                    ("streams_delay_col0", _concurrent(device), 0)):
        ref_net.concurrency = strategy
        ref_net.set_dropout_stream(1234, batch, 0)
        if strategy != "sequential":
            ref_net.zero_grad(set_to_none=True)  # the last run's gradients freed, then poisoned too
            _poison_freed_memory(device)
        install, remove = _delayed_column(delayed if delayed is not None else -1, cycles)
        install()
        try:
            runs[name] = _step_result(ref_net, x, y, mode)
        finally:
            remove()
    noise = _max_rel(runs["sequential_again"], runs["sequential"])
    diffs = {k: _max_rel(v, runs["sequential"]) for k, v in runs.items() if k.startswith("streams")}
    limit = max(4 * noise, 1e-6)
    return {"noise": noise, "limit": limit, **diffs, "ok": all(d <= limit for d in diffs.values())}


def training_speed(device="cuda:0", batches=(128, 256), modes=("fp32", "bf16_cl"), reps: int = 10,
                   num_classes: int = 1000, geometry: str = "imagenet", emit=None) -> dict:
    """Training images/s (median of `reps` timed steps, timing.train_step: the step `splitnet train`
    takes) of the split model with both columns on `device`, sequential and streams, against the
    grouped network, on batches already on the device, cudnn.benchmark on. A rate that doubles with
    the batch says the step is launch-bound. emit(result so far), if given, after each row."""
    res = {"device": str(device), "cudnn_benchmark": cudnn_autotune([device]), "reps": reps, "rows": []}
    for mode in modes:
        fmt = memory_format(mode)
        for batch in batches:
            torch.manual_seed(0)
            nets = {"split_sequential": SplitAlexNet(num_classes, devices=(device, device), geometry=geometry,
                                                     concurrency="sequential"),
                    "split_streams": SplitAlexNet(num_classes, devices=(device, device), geometry=geometry,
                                                  concurrency=_concurrent(device))}
            nets["grouped"] = GroupedAlexNet(nets["split_sequential"].config).to(device)
            side = nets["grouped"].input_side
            x = (torch.randn(batch, 3, side, side) * 60).to(device).contiguous(memory_format=fmt)
            y = torch.randint(0, num_classes, (batch,), device=device)
            row = {"precision": mode, "batch": batch}
            with precision(mode, torch.device(device).type):
                for name, net in nets.items():
                    net.to(memory_format=fmt).train()
                    opt = paper_optimizer(net)
                    for s in range(3):  # warm-up: cuDNN's algorithm search, the allocator
                        train_step(net, opt, x, y, step=s, mode=mode)
                    t = spread(timed(lambda: train_step(net, opt, x, y, step=3 + r, mode=mode), [torch.device(device)])
                               for r in range(reps))
                    row[f"{name}_images_per_s"] = batch / t["median"]
                    row[f"{name}_step_s"] = t
            row["streams_over_grouped"] = row["split_streams_images_per_s"] / row["grouped_images_per_s"]
            res["rows"].append(row)
            if emit:
                emit(res)
    return res


def _concurrent(device) -> str:
    """CUDA streams on a GPU; on the CPU (--dry-run) threads stand in, so the plumbing runs."""
    return "streams" if torch.device(device).type == "cuda" else "threads"


def _dry_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _write(path, result: dict) -> str:
    """result as JSON in `path`; the text. Written in place, no temporary file: the device machine
    returns at most 8 files from its output folder."""
    text = json.dumps(result, indent=1, default=str)
    with open(path, "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["env", "streams", "speed"])
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, on the CPU if no GPU (the plumbing only)")
    args = p.parse_args(argv)
    if args.what == "env":
        result = environment()
    elif not (torch.cuda.is_available() or args.dry_run):
        print(f"gpu_check {args.what}: no CUDA device (torch {torch.__version__}); nothing measured", file=sys.stderr)
        return 2
    emit = lambda partial: _write(args.out, partial)  # a step killed by its timeout keeps its rows
    if args.what == "streams":
        result = (streams_vs_sequential(_dry_device(), batch=2, cycles=1000, num_classes=10, geometry="cifar",
                                        emit=emit) if args.dry_run else streams_vs_sequential(emit=emit))
    elif args.what == "speed":
        result = (training_speed(_dry_device(), batches=(2,), reps=1, num_classes=10, geometry="cifar", emit=emit)
                  if args.dry_run else training_speed(emit=emit))
    text = _write(args.out, result)
    print(text[:2000])
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
