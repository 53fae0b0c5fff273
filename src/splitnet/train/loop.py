"""Training (§5): the paper's SGD on the split model, with run directories that resume exactly.

A run directory holds:
  config.toml      the resolved config (paper defaults + the experiment file + --set overrides)
  run.json         git commit, devices, data set, classes, start time
  metrics.jsonl    one JSON object per line: {"kind": "train", step, epoch, loss, lr, ...} per step,
                   {"kind": "eval", epoch, step, val_top1_err, val_top5_err} per evaluation
  checkpoint.pt    the last checkpoint (atomic: temporary file, then rename); weights_only loadable
SIGINT/SIGTERM finish the current step, save and exit; `--resume` continues with exactly the batches,
dropout masks and losses of an uninterrupted run (bitwise on the CPU). A NaN or infinite loss stops the
run with a message naming the step; the last good checkpoint is kept.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, to_dict
from ..data import PackedDataset, resolve_data
from ..data.rng import derive_seed
from ..model.precision import autocast, memory_format, tf32
from ..model.tune import calibrate, worth_calibrating
from . import checkpoint as ckpt
from .config import TrainConfig, dump_toml, load_config
from .distributed import DistributedError
from .evaluate import evaluate_split, input_batches
from .optim import MilestoneSchedule, PaperSGD, PlateauSchedule, drop_lr, param_groups
from .runtime import make_runtime

log = logging.getLogger("splitnet")

STREAM_DROPOUT = 3  # derive_seed stream for dropout masks (data/rng.py uses 1 and 2)


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, ...); the last good checkpoint is kept."""


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop checks it after each step, saves and leaves."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second ^C: the user means it
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("train: %s received; finishing this step, saving, exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Progress:
    """tqdm on a terminal; plain log lines every `every` steps otherwise (CI logs, files)."""

    def __init__(self, total: int, done: int, every: int, enabled: bool = True, max_seconds: float = 0.0):
        self.total, self.every, self.t0, self.done0 = total, every, time.time(), done
        self.max_seconds = max_seconds  # a time cap (max_minutes) bounds the time left too
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # here, not at the top: only a terminal gets a bar
            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)

    def update(self, step: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", lr=f"{lr:g}", img_s=f"{ips:.0f}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            el = time.time() - self.t0
            rate = (step - self.done0) / el if el > 0 else 0.0
            left = (self.total - step) / rate if rate > 0 else float("nan")
            if self.max_seconds:
                left = min(left, max(0.0, self.max_seconds - el))
            print(f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:g} "
                  f"{ips:.1f} img/s, {_hms(el)} elapsed, {_hms(left)} left", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Metrics:
    """metrics.jsonl: appended line by line and flushed, so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a")

    def write(self, **rec) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()

    @staticmethod
    def truncate_to(path: Path, step: int, epoch: int) -> None:
        """Drop lines a resumed run will write again: train steps after `step`, evals of epochs >= epoch."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if r.get("kind") == "eval" and r.get("epoch", 0) >= epoch:
                continue
            if r.get("kind") == "train" and r.get("step", 0) > step:
                continue
            keep.append(line)
        path.write_text("".join(k + "\n" for k in keep))


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _schedule(cfg: TrainConfig):
    o = cfg.optim
    if o.schedule == "plateau":
        return PlateauSchedule(o.patience, o.factor, o.max_drops, o.min_delta)
    if o.schedule == "milestones":
        return MilestoneSchedule(o.milestones, o.factor)
    return None


def train(cfg: TrainConfig | None = None, out=None, resume: bool = False, sets=(), progress: bool = True) -> dict:
    """Train `cfg` into run directory `out` (or resume the run there). Returns a summary dict:
    {status: finished|max_steps|max_minutes|interrupted, step, epoch, run_dir, last eval ...}.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 alone writes the run directory."""
    out = Path(out)
    ck = None
    if resume:
        if not (out / "config.toml").is_file():
            raise FileNotFoundError(f"{out}: not a run directory (no config.toml) to resume")
        cfg = load_config(None, sets, base=tomllib.loads((out / "config.toml").read_text()))
        ck = ckpt.load(out / "checkpoint.pt") if (out / "checkpoint.pt").exists() else None
    elif cfg is None:
        raise ValueError("train: a config is needed unless resuming")
    rt = make_runtime(cfg)
    failed = False
    try:
        return _train(cfg, out, ck, resume, progress and rt.is_main, rt)
    except RuntimeError as e:
        failed = True
        if rt.mesh is None or isinstance(e, TrainingError):
            raise
        # A collective failed: a peer died (connection closed) or hung (timeout). Say so in one line.
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {rt.rank}: a collective failed ({msg}); another rank died or hung for more than "
            f"dist_timeout_s={cfg.dist_timeout_s:g}s. The last complete checkpoint in {out} is kept: "
            f"resume with splitnet train --resume {out}") from None
    finally:
        if not failed:
            rt.close()


def _train(cfg, out: Path, ck, resume: bool, progress: bool, rt) -> dict:
    main = rt.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(dump_toml(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not main:
        rt.barrier()  # rank 0 generates / prepares the data first
    cache, data_desc = resolve_data(cfg.data)
    if main:
        rt.barrier()
    train_ds = PackedDataset(cache, "train")
    val_ds = PackedDataset(cache, "val") if _has_split(cache, "val") else None
    classes = train_ds.classes
    torch.manual_seed(cfg.seed)  # the init
    model = rt.build_model(cfg, len(classes))
    check_input_geometry(cfg, model, train_ds.image_size, cache)
    fmt = memory_format(cfg.precision)
    if fmt == torch.channels_last:  # bf16_cl: conv weights NHWC (parameters keep their identity)
        model.to(memory_format=fmt)
    opt = PaperSGD(param_groups(model, cfg.optim.weight_decay, cfg.optim.bias_decay),
                   lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    sched = _schedule(cfg)
    step, epoch, batch = 0, 0, 0
    if ck is not None:
        ckpt.restore_model(model, ck, opt)
        for g in opt.param_groups:
            g["lr"] = float(ck["lr"])
        if sched is not None and ck.get("schedule"):
            sched.load_state_dict(ck["schedule"])
        step, epoch, batch = int(ck["step"]), int(ck["epoch"]), int(ck["batch"])
        ckpt.set_rng_state(ck["rng"])
        if main:
            Metrics.truncate_to(out / "metrics.jsonl", step, epoch)
            log.info("train: resuming %s at step %d (epoch %d, batch %d)", out, step, epoch, batch)
    elif resume and main:
        log.info("train: %s has no checkpoint yet; starting from step 0", out)
        Metrics.truncate_to(out / "metrics.jsonl", 0, 0)
    mesh = rt.mesh
    concurrency = {"requested": cfg.concurrency}
    if mesh is None and worth_calibrating(model):  # a GPU: time the candidates once (model/tune.py)
        tuned = calibrate(model, cfg.batch_size, mode=cfg.precision)
        concurrency["calibration_step_s"] = tuned["step_s"]
        log.info("train: concurrency auto -> %s (one training pass: %s)", tuned["strategy"], ", ".join(
            f"{k} {1000 * v:.1f} ms" for k, v in tuned["step_s"].items()))
    concurrency["strategy"] = model.strategy
    if main:
        (out / "run.json").write_text(json.dumps({
            "commit": git_commit(),
            "devices": [str(d) for d in model.devices] if mesh is None else
            [f"{mesh.world} ranks ({mesh.replicas} replica(s) x {mesh.columns} columns), {mesh.device} each"],
            "data": data_desc, "cache": str(cache), "classes": classes, "train_images": len(train_ds),
            "val_images": len(val_ds) if val_ds is not None else 0, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "layout": model.layout.name,
            "precision": cfg.precision, "concurrency": concurrency,
            "exchange_bytes_per_image": model.layout.exchange_bytes_per_image(),
            "params": model.layout.params(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))

    n_batches = len(train_ds) // cfg.batch_size
    if n_batches == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(train_ds)} images)")
    total = cfg.epochs * n_batches
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    metrics = Metrics(out / "metrics.jsonl") if main else None
    bar = _Progress(total, step, cfg.log_every, progress, 60 * cfg.max_minutes)
    state = dict(step=step, epoch=epoch, batch=batch)

    def save():
        weights, velocity = rt.checkpoint_tensors(model, opt)
        if weights is None:
            return
        payload = dict(model=weights, velocity=velocity, format=ckpt.FORMAT, step=state["step"],
                       epoch=state["epoch"], batch=state["batch"], lr=opt.param_groups[0]["lr"],
                       rng=ckpt.rng_state(), schedule=sched.state_dict() if sched is not None else {},
                       config=_plain(cfg), classes=list(classes), layout=model.layout.name)
        ckpt.atomic_save(payload, out / "checkpoint.pt")

    def write(**rec):
        if metrics is not None:
            metrics.write(**rec)

    in_dev = model.devices[model.local[0]]
    head_dev = model.devices[model.layout.head]
    status, t_start = "finished", time.time()
    last_eval = {}
    try:
        with _Stop() as stop, tf32(cfg.precision):
            while state["epoch"] < cfg.epochs and status == "finished":
                e = state["epoch"]
                loader = input_batches(model, cache, "train", cfg.batch_size, cfg, train_ds, epoch=e,
                                       train=True, start_batch=state["batch"])
                # Creating the iterator draws a base seed from the global RNG: fork it, so nothing
                # depends on where in an epoch a run was resumed.
                with torch.random.fork_rng(devices=[]):
                    it = iter(loader)
                while True:
                    if cfg.max_steps and state["step"] >= cfg.max_steps:
                        status = "max_steps"
                        break
                    try:
                        x, y = next(it)
                    except StopIteration:
                        break
                    except Exception:
                        if stop.signal is not None:  # a worker killed by the same ^C
                            status = "interrupted"
                            break
                        raise
                    t0 = time.time()
                    global_batch = len(x)
                    x, y, offset = rt.share(x, y)
                    x = x.to(in_dev, non_blocking=True).contiguous(memory_format=fmt)
                    y = y.to(head_dev, non_blocking=True)
                    # Dropout masks from (seed, step): identical on every placement and after a resume.
                    model.set_dropout_stream(derive_seed(cfg.seed, STREAM_DROPOUT, state["step"]),
                                             global_batch, offset)
                    with autocast(cfg.precision, in_dev.type):  # forward and loss; backward follows
                        logits = model(x)
                        loss = F.cross_entropy(logits.float(), y) if logits is not None else None
                    opt.zero_grad(set_to_none=True)
                    rt.backward(model, loss)
                    rt.sync_grads(model)
                    lv = loss.item() if loss is not None else None
                    err = (logits.argmax(1) != y).float().mean().item() if logits is not None else None
                    out_of_time = bool(cfg.max_minutes and time.time() - t_start >= 60 * cfg.max_minutes)
                    lv, err, why = rt.agree(lv, err, stop.signal is not None, out_of_time)
                    if not math.isfinite(lv):
                        raise TrainingError(
                            f"loss is {lv} at step {state['step'] + 1} (epoch {e}); stopped. The last good "
                            f"checkpoint ({out / 'checkpoint.pt'}, step {_ck_step(out)}) is kept. "
                            f"Lower optim.lr or check the data.")
                    opt.step()
                    state["step"] += 1
                    state["batch"] += 1
                    dt = time.time() - t0
                    lr = opt.param_groups[0]["lr"]
                    # step_s: this step's compute (batch in hand to update done); time: the wall
                    # clock, whose differences also count the waits for data (bench.input_path)
                    write(kind="train", step=state["step"], epoch=e, batch=state["batch"], loss=lv,
                          train_top1_err=err, lr=lr, step_s=dt, images_per_s=global_batch / dt, time=time.time())
                    bar.update(state["step"], e, lv, lr, global_batch / dt)
                    if why:  # every rank agrees on why (runtime.agree)
                        status = why
                        break
                    if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                        save()
                if status != "finished":
                    break
                # End of epoch: evaluate, maybe drop eps (§5), checkpoint at the next epoch's start.
                if val_ds is not None and (e + 1) % cfg.eval_every == 0:
                    last_eval = evaluate_split(model, cache, val_ds, cfg, rt)
                    write(kind="eval", epoch=e, step=state["step"], **last_eval)
                    if main:
                        log.info("epoch %d: val top-1 err %.4f, top-5 err %.4f", e, last_eval["val_top1_err"],
                                 last_eval["val_top5_err"])
                if sched is not None and sched.step(e, last_eval.get("val_top1_err")):
                    new = drop_lr(opt, cfg.optim.factor)
                    if main:
                        log.info("epoch %d: learning rate divided by %g -> %g", e, cfg.optim.factor, new)
                state["epoch"] += 1
                state["batch"] = 0
                save()
            if status in ("max_steps", "max_minutes") and cfg.eval_at_stop and val_ds is not None:
                last_eval = evaluate_split(model, cache, val_ds, cfg, rt)
                write(kind="eval", epoch=state["epoch"], step=state["step"], at_stop=True, **last_eval)
                if main:
                    log.info("stopped at step %d (%s): val top-1 err %.4f, top-5 err %.4f", state["step"],
                             status, last_eval["val_top1_err"], last_eval["val_top5_err"])
            if status != "finished":
                save()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    summary = dict(status=status, run_dir=str(out), **state, minutes=(time.time() - t_start) / 60, **last_eval)
    if status == "interrupted" and main:
        log.warning("train: interrupted at step %d; resume with: splitnet train --resume %s", state["step"], out)
    return summary


def check_input_geometry(cfg: TrainConfig, model, cache_side: int, cache) -> None:
    """The crop the data pipeline cuts must be the model's input, cut from images of the size the
    config expects: a mismatch is a one-line error naming the keys, before any training."""
    if cfg.data.image_size != cache_side:
        raise ConfigError(f"data.image_size = {cfg.data.image_size}, but the cache {cache} holds "
                          f"{cache_side}x{cache_side} images: set data.image_size = {cache_side} or "
                          f"prepare the data at {cfg.data.image_size}")
    if cfg.data.crop_size != model.input_side:
        raise ConfigError(f"data.crop_size = {cfg.data.crop_size}, but the model (model.geometry = "
                          f"{cfg.model.geometry!r}, input_mode {cfg.model.input_mode!r}) takes "
                          f"{model.input_side}x{model.input_side} crops: set data.crop_size = {model.input_side}")


def _ck_step(out: Path):
    try:
        return int(ckpt.load(out / "checkpoint.pt")["step"])
    except (FileNotFoundError, ValueError):
        return "none yet"


def _has_split(cache, split: str) -> bool:
    try:
        PackedDataset(cache, split)
        return True
    except FileNotFoundError:
        return False


def _plain(cfg) -> dict:
    return to_dict(cfg)


# ---- command line -------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (the paper's recipe; experiments/*.toml)")
    p.add_argument("--config", help="TOML file (experiments/...); default: the paper's values")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. max_steps=10 or optim.lr=0.02 (repeatable)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="RUNDIR", help="continue the run in RUNDIR")
    p.add_argument("--data", help="a folder of class folders or a prepared cache (sets data.root)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    sets = list(args.sets) + ([f'data.root="{args.data}"'] if args.data else [])
    if args.resume:
        summary = train(out=args.resume, resume=True, sets=sets)
    else:
        if not args.out:
            raise FileNotFoundError("train: --out RUNDIR is needed (or --resume RUNDIR)")
        summary = train(load_config(args.config, sets), args.out)
    print(json.dumps(summary))
    return 130 if summary["status"] == "interrupted" else 0
