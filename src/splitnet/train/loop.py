"""Training (§5): the paper's SGD on the split model, in a run directory that resumes exactly.

    train()            validate everything (config, data, model, checkpoint), then write the run
                       directory (rundir.py) and train epoch by epoch:
    train_one_epoch()  the SGD steps of one epoch (train_step: one batch);
    end_of_epoch()     evaluate, drop eps by the schedule, keep the best weights, checkpoint.

Where a run is lives in a TrainState (state.py) that round-trips through the checkpoint, so that
`--resume` continues with exactly the batches, dropout masks, learning rates and losses of an
uninterrupted run (bitwise on the CPU). Budgets (max_steps, max_minutes) are run totals. SIGINT and
SIGTERM finish the current step, save and exit; a NaN loss stops the run, keeping the last good
checkpoint. In fp16 a step whose gradients overflow is skipped (not applied, but counted and logged)
and the loss scale halved (scaler.py).

The step itself is train/step.py's sgd_step, the one the benchmarks time. Its loss and training
error stay on the device and are read every log_every steps (_read_pending), so the host can queue
the next step while a GPU works: a NaN loss stops the run at that read, at most log_every - 1 steps
after the step it names, and always before anything is evaluated or checkpointed.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, replace, set_item, to_dict
from ..data import PackedDataset, resolve_data
from ..data.cache import identity
from ..model.precision import memory_format, needs_loss_scaling, tf32
from ..model.placement import cudnn_autotune
from ..model.tune import calibrate, worth_calibrating
from . import checkpoint as ckpt
from .config import (TrainConfig, check_num_classes, config_changes, dump_toml, load_config, read_toml,
                     resume_changes, resume_lr, unsafe_changes)
from .evaluate import evaluate_split, input_batches
from .optim import MilestoneSchedule, PaperSGD, PlateauSchedule, drop_lr, param_groups
from .progress import Progress, StopFlag
from .rundir import (Metrics, RunDir, RunError, atomic_write_text, budget_fraction, budget_reached, git_commit,
                     read_metrics, run_done)
from .runtime import make_runtime
from .scaler import LossScaler
from .state import TrainState
from .step import STREAM_DROPOUT, host_floats, sgd_step  # noqa: F401 (STREAM_DROPOUT: re-exported)

log = logging.getLogger("splitnet")

__all__ = ["train", "train_one_epoch", "end_of_epoch", "train_or_resume", "check_same_experiment", "read_metrics",
           "TrainingError"]


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, ...); the last good checkpoint is kept."""


@dataclass
class Run:
    """What one segment of a run (a start or a resume) works with; built by _start()."""

    cfg: TrainConfig
    dir: RunDir
    rt: object  # runtime.LocalRuntime or DistRuntime
    model: torch.nn.Module
    opt: PaperSGD
    sched: object  # PlateauSchedule, MilestoneSchedule or None
    cache: Path
    train_ds: PackedDataset
    val_ds: PackedDataset | None
    classes: list
    state: TrainState
    progress: bool = True  # progress lines or a bar (the main process only)
    metrics: Metrics | None = None  # the main process's metrics.jsonl
    bar: Progress | None = None
    stop: StopFlag = field(default_factory=StopFlag)
    scaler: LossScaler = field(default_factory=lambda: LossScaler(enabled=False))  # fp16's loss scaler
    t0: float = field(default_factory=time.time)  # this segment's start
    pending: list = field(default_factory=list)  # train records whose loss and error are not read yet
    elapsed0: float = 0.0  # training time of the segments before this one

    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self.t0

    def log(self, **rec) -> None:
        if self.metrics is not None:
            self.metrics.write(**rec)

    def save(self) -> None:
        """checkpoint.pt: weights, velocities and the TrainState (every rank takes part)."""
        _read_pending(self)  # a NaN since the last read stops the run before its weights are saved
        self.state.elapsed_s = self.elapsed()
        self.state.scaler = self.scaler.state_dict()
        self._write(self.dir.checkpoint, velocities=True)

    def save_best(self) -> None:
        """best.pt: the weights of the best validation evaluation (loadable like checkpoint.pt)."""
        self._write(self.dir.best, velocities=False)

    def _write(self, path: Path, velocities: bool) -> None:
        weights, velocity = self.rt.checkpoint_tensors(self.model, self.opt)
        if weights is None:
            return  # not the main process
        payload = dict(model=weights, format=ckpt.FORMAT, rng=ckpt.rng_state(), config=to_dict(self.cfg),
                       classes=list(self.classes), layout=self.model.layout.name, **self.state.to_checkpoint())
        if velocities:
            payload["velocity"] = velocity
        ckpt.save(payload, path)


# ---- a run from start to end ---------------------------------------------------------------------
def train(cfg: TrainConfig | None = None, out=None, resume: bool = False, sets=(), progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train `cfg` into run directory `out`, or resume the run there: with `sets` (--set) over its
    config.toml, or with `cfg` as the wanted config; a resume may change only config.RESUME_SAFE.
    Returns a summary dict: {status: finished | max_steps | max_minutes | interrupted, step, epoch,
    run_dir, minutes, the last evaluation, best}.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 alone writes the run directory."""
    rundir = RunDir(out)
    if resume:
        cfg, ck, changes = _resume_config(rundir, sets, cfg)
    elif cfg is None:
        raise ValueError("train: a config is needed unless resuming")
    else:
        ck, changes = None, {}
        if rundir.is_run() and not overwrite:
            raise _holds_a_run(rundir)
    rt = make_runtime(cfg)
    failed = False
    try:
        run = _start(cfg, rundir, ck, changes, rt, progress and rt.is_main, not resume, overwrite)
        return _run_epochs(run)
    except Exception as e:
        failed = True
        if rt.mesh is None or isinstance(e, (TrainingError, RunError)):  # the same on every rank
            raise
        # Under torchrun: this rank's own error (raised with its traceback), or a collective that
        # failed because another rank did (one line naming that rank and its error, if it left one).
        err = rt.failure(e, rundir.path, cfg.dist_timeout_s)
        if err is e:
            raise
        raise err from None
    finally:
        rundir.unlock()
        if not failed:
            rt.close()


def train_or_resume(cfg: TrainConfig, out, progress: bool = False) -> dict:
    """The rule `reproduce` and `ablate` share: a run that is done (rundir.run_done: its epochs, or
    its step or time budget, reached under `cfg`) is kept as it is; a started one is resumed with
    `cfg` (which may raise its budgets, nothing unsafe); else it starts."""
    rundir = RunDir(out)
    check_same_experiment(rundir.path, cfg)
    if run_done(rundir.path, cfg):
        log.info("%s is done; kept", rundir.path)
        return {"status": "done", "run_dir": str(rundir.path)}
    return train(cfg, rundir.path, resume=rundir.is_run(), progress=progress)


def check_same_experiment(run_dir, cfg: TrainConfig) -> None:
    """A ConfigError naming the run and the key when the run in `run_dir` was trained with a setting
    that `cfg` changes and a resume may not (config.RESUME_SAFE): its results answer another question,
    so neither keeping nor continuing it is right. Nothing to check where no run is."""
    rundir = RunDir(run_dir)
    if not rundir.config.is_file():
        return
    stale = unsafe_changes(config_changes(_saved_config(rundir)[1], cfg))
    if stale:
        k, (old, new) = next(iter(stale.items()))
        more = f" (and {len(stale) - 1} more: {', '.join(list(stale)[1:])})" if len(stale) > 1 else ""
        raise ConfigError(f"{rundir.path}: trained with {k} = {old!r}, but its experiment now sets {new!r}"
                          f"{more}. Move or delete that run directory to train it again, or choose another --out")


def _holds_a_run(rundir: RunDir) -> RunError:
    return RunError(f"{rundir.path} already holds a run: continue it with --resume {rundir.path}, "
                    f"start it again with --overwrite, or choose another --out")


def _saved_config(rundir: RunDir) -> tuple:
    """(config.toml as a dict, the TrainConfig it gives) of the run in `rundir`."""
    base = read_toml(rundir.config)
    return base, load_config(None, (), base=base)


def _resume_config(rundir: RunDir, sets, wanted: TrainConfig | None) -> tuple:
    """(config with the resume's overrides, the checkpoint or None, {key: (old, new)} changed):
    checked, nothing written."""
    if not rundir.config.is_file():
        raise FileNotFoundError(f"{rundir.path}: not a run directory (no config.toml) to resume")
    base, saved = _saved_config(rundir)
    cfg = load_config(None, sets, base=base if wanted is None else to_dict(wanted))
    changes = resume_changes(saved, cfg)
    ck = ckpt.load(rundir.checkpoint) if rundir.checkpoint.exists() else None
    return cfg, ck, changes


def _start(cfg: TrainConfig, rundir: RunDir, ck, changes: dict, rt, progress: bool, new_run: bool,
           overwrite: bool) -> Run:
    """Build everything a segment needs and check it (data, geometry, batch size, checkpoint); only
    then write the run directory, so a failed start or a refused resume leaves it as it was."""
    main = rt.is_main
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not main:
        rt.barrier()  # rank 0 generates / prepares the data first
    cache, data_desc = resolve_data(cfg.data)
    if main:
        rt.barrier()
    if not new_run:
        rundir.check_same_data(cache)
    train_ds = PackedDataset(cache, "train")
    val_ds = PackedDataset(cache, "val") if _has_split(cache, "val") else None
    if val_ds is None and main:
        log.warning("train: %s has no validation split: training without evaluations (no val errors, no best.pt)",
                    cache)
    classes = train_ds.classes
    check_num_classes(cfg, classes, cache)
    cfg = replace(cfg, model=replace(cfg.model, num_classes=len(classes)))  # what the model is built with
    torch.manual_seed(cfg.seed)  # the init
    model = rt.build_model(cfg, len(classes))
    cudnn_autotune(model.devices)  # CUDA training: before calibrate() times the strategies
    check_input_geometry(cfg, model, train_ds.image_size, cache)
    if len(train_ds) < cfg.batch_size:
        raise ConfigError(f"batch_size = {cfg.batch_size} is larger than the training set ({len(train_ds)} "
                          f"images in {cache})")
    if memory_format(cfg.precision) == torch.channels_last:  # fp32_cl, bf16_cl, fp16_cl: conv weights NHWC
        model.to(memory_format=torch.channels_last)
    opt = PaperSGD(param_groups(model, cfg.optim.weight_decay, cfg.optim.bias_decay),
                   lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    sched = _schedule(cfg)
    state = TrainState(lr=cfg.optim.lr)
    if ck is not None:
        state = _restore(ck, rundir, model, opt, sched, classes, resume_lr(ck, cfg))
    scaler = LossScaler(needs_loss_scaling(cfg.precision), cfg.optim.loss_scale_init)
    scaler.load_state_dict(state.scaler)  # a resume continues at the scale the run had reached
    run = Run(cfg, rundir, rt, model, opt, sched, cache, train_ds, val_ds, classes, state, progress=progress,
              elapsed0=state.elapsed_s, scaler=scaler)
    if main:
        _write_start(run, ck, new_run, overwrite, data_desc)
    run.t0 = time.time()  # the segment's training clock starts after the checks and a GPU calibration
    if main:
        run.metrics = Metrics(rundir.metrics)
        for k, (old, new) in changes.items():
            log.info("train: resume changes %s: %r -> %r", k, old, new)
        if changes:
            run.log(kind="resume", step=state.step, changes={k: list(v) for k, v in changes.items()})
    return run


def _restore(ck: dict, rundir: RunDir, model, opt, sched, classes, lr) -> TrainState:
    """Weights, velocities, RNG and TrainState from the checkpoint; `lr` (config.resume_lr), if not
    None, replaces the checkpoint's eps."""
    if list(ck.get("classes", classes)) != list(classes):
        raise RunError(f"{rundir.checkpoint}: trained on {len(ck['classes'])} classes, but the data "
                       f"has {len(classes)} ({', '.join(classes[:5])}...)")
    try:
        ckpt.restore_model(model, ck, opt)
    except ValueError as e:
        raise RunError(f"{rundir.checkpoint}: {e}") from None
    state = TrainState.from_checkpoint(ck)
    if lr is not None:
        state.lr = lr
        log.info("train: optim.lr set to %g on resume (the checkpoint's eps was %g)", state.lr, float(ck["lr"]))
    for g in opt.param_groups:
        g["lr"] = state.lr
    if sched is not None and state.schedule:
        sched.load_state_dict(state.schedule)
    ckpt.set_rng_state(ck["rng"])
    return state


def _write_start(run: Run, ck, new_run: bool, overwrite: bool, data_desc) -> None:
    """Everything is checked: lock the folder and write config.toml, run.json and the metrics' cut."""
    cfg, rundir, state, model, mesh = run.cfg, run.dir, run.state, run.model, run.rt.mesh
    rundir.lock()
    if new_run and rundir.is_run():  # checked again under the lock: a run started meanwhile
        if not overwrite:
            raise _holds_a_run(rundir)
        rundir.remove_run()
    gone = rundir.clean_temporaries()
    if gone:
        log.info("train: removed %d temporary file(s) a killed write left: %s", len(gone), ", ".join(gone))
    atomic_write_text(rundir.config, dump_toml(cfg))
    if budget_reached(cfg, state.step, state.epoch, state.elapsed_s) is None:  # a done run rewrites
        Metrics.truncate_to(rundir.metrics, state.step, state.epoch)  # nothing: its at_stop eval stays
    if ck is not None:
        log.info("train: resuming %s at step %d (epoch %d, batch %d)", rundir.path, state.step, state.epoch,
                 state.batch)
    concurrency = {"requested": cfg.concurrency}
    if mesh is None and worth_calibrating(model):  # a GPU: time the candidates once (model/tune.py)
        tuned = calibrate(model, cfg.batch_size, mode=cfg.precision)
        concurrency["calibration_step_s"] = tuned["step_s"]
        log.info("train: concurrency auto -> %s (one training pass: %s)", tuned["strategy"], ", ".join(
            f"{k} {1000 * v:.1f} ms" for k, v in tuned["step_s"].items()))
    concurrency["strategy"] = model.strategy
    static = {"data": data_desc, "cache": str(run.cache), "data_identity": identity(run.cache), "classes": run.classes,
              "train_images": len(run.train_ds), "val_images": len(run.val_ds) if run.val_ds is not None else 0,
              "layout": model.layout.name,
              "exchange_bytes_per_image": model.layout.exchange_bytes_per_image(),
              "params": model.layout.params()}
    segment = {"commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": state.step,
               "devices": [str(d) for d in model.devices] if mesh is None else
               [f"{mesh.world} ranks ({mesh.replicas} replica(s) x {mesh.columns} columns), {mesh.device} each"],
               "torch": torch.__version__, "threads": torch.get_num_threads(), "precision": cfg.precision,
               "concurrency": concurrency, "cudnn_benchmark": torch.backends.cudnn.benchmark}
    rundir.start_segment(static, segment)


def _run_epochs(run: Run) -> dict:
    """Epochs until the config's end or a budget, a signal or an error stops the run."""
    cfg, st = run.cfg, run.state
    status = budget_reached(cfg, st.step, st.epoch, run.elapsed0)
    worked = status is None  # a resume of a run that is already done trains and writes nothing
    run.bar = Progress(_total_steps(run), st.step, cfg.log_every, run.progress and worked,
                       max(0.0, 60 * cfg.max_minutes - run.elapsed0) if cfg.max_minutes else 0.0)
    try:
        with run.stop, tf32(cfg.precision):
            while status is None:
                status = train_one_epoch(run)
                if status is None:
                    end_of_epoch(run)
                    status = budget_reached(cfg, st.step, st.epoch, run.elapsed())
            if worked and status in ("max_steps", "max_minutes") and st.batch and cfg.eval_at_stop and run.val_ds:
                _evaluate(run, at_stop=True)  # a mid-epoch stop: evaluate what it has
            if worked and (st.batch or status == "interrupted"):
                st.status = status
                run.save()  # end_of_epoch saved an epoch's end already
    finally:
        run.bar.close()
        if run.metrics is not None:
            run.metrics.close()
            run.dir.end_segment(status=status, step=st.step)
    if status == "interrupted" and run.rt.is_main:
        log.warning("train: interrupted at step %d; resume with: splitnet train --resume %s", st.step, run.dir.path)
    return dict(status=status, run_dir=str(run.dir.path), step=st.step, epoch=st.epoch, batch=st.batch,
                minutes=(time.time() - run.t0) / 60, total_minutes=run.elapsed() / 60, best=st.best,
                **st.last_eval)


def train_one_epoch(run: Run) -> str | None:
    """The SGD steps of epoch run.state.epoch from batch run.state.batch on (§5). Returns why the run
    stops inside the epoch (max_steps, max_minutes, interrupted), or None at the epoch's end."""
    cfg, st = run.cfg, run.state
    offset, rows = run.rt.share(cfg.batch_size)  # a data-parallel replica loads only its rows
    loader = input_batches(run.model, run.cache, "train", cfg.batch_size, cfg, run.train_ds, epoch=st.epoch,
                           train=True, start_batch=st.batch, share=None if rows == cfg.batch_size else (offset, rows))
    # Creating the iterator draws a base seed from the global RNG: fork it, so nothing depends on
    # where in an epoch a run was resumed.
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    while True:
        if cfg.max_steps and st.step >= cfg.max_steps:
            return "max_steps"
        try:
            x, y = next(it)
        except StopIteration:
            return None
        except Exception:
            if run.stop.signal is not None:  # a worker killed by the same ^C
                return "interrupted"
            raise
        why = train_step(run, x, y)
        if why:
            return why


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """One SGD step on this process's rows x [B/R, 3, S, S], y [B/R] of the global batch (R replicas).
    Returns why to stop after it, if anything."""
    cfg, st, model, rt = run.cfg, run.state, run.model, run.rt
    t0 = time.time()
    global_batch = cfg.batch_size
    offset = rt.share(global_batch)[0]
    x = x.to(model.devices[model.local[0]], non_blocking=True).contiguous(memory_format=memory_format(cfg.precision))
    y = y.to(model.devices[model.layout.head], non_blocking=True)
    # Dropout masks from (seed, step): identical on every placement and after a resume.
    res = sgd_step(model, run.opt, x, y, run.scaler, rt, step=st.step, seed=cfg.seed, mode=cfg.precision,
                   full_batch=global_batch, offset=offset, signalled=lambda: run.stop.signal is not None,
                   elapsed=run.elapsed)
    st.step += 1
    st.batch += 1
    dt = time.time() - t0
    # step_s: this step's compute as the host saw it (batch in hand to update queued; on a GPU the
    # kernels may still run); time: the wall clock, whose differences also count the waits for data
    # (bench.input_path). fp16 records add loss_scale (the scale this step's backward used) and, on
    # a skipped step, skipped: true.
    fp16 = {"loss_scale": res.scale, **({"skipped": True} if res.overflow else {})} if run.scaler.enabled else {}
    run.pending.append(dict(kind="train", step=st.step, epoch=st.epoch, batch=st.batch, loss=res.loss,
                            train_top1_err=res.err, lr=st.lr, step_s=dt, images_per_s=global_batch / dt,
                            time=time.time(), **fp16))
    if res.overflow or st.step % cfg.log_every == 0:
        _read_pending(run)  # on an overflow first: a non-finite loss stops the run, not the skip
    if res.overflow:
        _skipped(run, res.scale)
    _budget_drops(run, res.elapsed)  # for the next step
    why = "interrupted" if res.signalled else budget_reached(cfg, st.step, st.epoch, res.elapsed, steps=False)
    if not why and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
        run.save()
    return why


def _read_pending(run: Run) -> None:
    """Read the losses and errors of the steps since the last read off the device (one transfer for
    all) and write their records and progress; a non-finite loss stops the run (TrainingError) at the
    step it names. The values are bitwise what .item() at each step gave."""
    recs, run.pending = run.pending, []
    if not recs:
        return
    n = len(recs)
    vals = host_floats([r["loss"] for r in recs] + [r["train_top1_err"] for r in recs])
    for r, lv, err in zip(recs, vals[:n], vals[n:]):
        if not math.isfinite(lv):  # in fp16 too: an inf gradient is skipped, a non-finite loss stops
            raise TrainingError(
                f"loss is {lv} at step {r['step']} (epoch {r['epoch']}); stopped. {run.dir.what_is_kept()}. "
                f"Lower optim.lr or check the data.")
        r.update(loss=lv, train_top1_err=err)
        run.log(**r)
        run.bar.update(r["step"], r["epoch"], lv, r["lr"], r["images_per_s"])


def _skipped(run: Run, scale: float) -> None:
    """After a step whose fp16 gradients overflowed on some rank (agreed): sgd_step skipped the
    update, weights and velocities stay as they were, and the loss scale backed off (scaler.py). A
    skipped step still counts (its batch is consumed), so the batches, dropout streams and budgets
    of the steps after it, and a resume, stay aligned with the step count."""
    st, scaler = run.state, run.scaler
    if scaler.exhausted:
        raise TrainingError(
            f"gradients overflow at every loss scale (down to {scale:g}) at step {st.step}; stopped. "
            f"{run.dir.what_is_kept()}. "
            f"Lower optim.lr or train in fp32/bf16.")
    if run.rt.is_main:
        log.info("step %d: fp16 gradients overflow at loss scale %g; update skipped, scale -> %g",
                 st.step, scale, scaler.scale)


def _budget_drops(run: Run, elapsed: float) -> None:
    """optim.budget_drops: by the k-th listed fraction of a capped run's budget, eps has been divided
    at least k times in all (a deviation from the paper's plateau rule, for runs too short to reach a
    plateau; experiments/reproduce.toml). Drops the schedule made count: stacked on them, a plateau
    drop and the two budget drops took one reproduce seed from eps 0.005 to 5e-6 within 52 steps."""
    cfg, st = run.cfg, run.state
    due = sum(f <= budget_fraction(cfg, st.step, elapsed) for f in cfg.optim.budget_drops)
    made = st.budget_drops + (run.sched.drops if run.sched is not None else 0)
    while made < due:
        st.budget_drops += 1
        made += 1
        st.lr = drop_lr(run.opt, cfg.optim.factor, cfg.optim.drop_velocity)
        if run.rt.is_main:
            log.info("step %d: %d%% of the budget spent; learning rate divided by %g -> %g", st.step,
                     round(100 * cfg.optim.budget_drops[due - 1]), cfg.optim.factor, st.lr)


def end_of_epoch(run: Run) -> None:
    """After an epoch: evaluate (every eval_every epochs), drop eps by the schedule (§5), checkpoint."""
    cfg, st = run.cfg, run.state
    e = st.epoch
    fresh = None
    if run.val_ds is not None and (e + 1) % cfg.eval_every == 0:
        fresh = _evaluate(run)
    # The plateau rule counts evaluations: an epoch without one is not a non-improving epoch, so
    # the drops do not depend on eval_every's phase or on where a run was resumed.
    if run.sched is not None and run.sched.step(e, fresh["val_top1_err"] if fresh else None):
        st.lr = drop_lr(run.opt, cfg.optim.factor, cfg.optim.drop_velocity)
        if run.rt.is_main:
            log.info("epoch %d: learning rate divided by %g -> %g", e, cfg.optim.factor, st.lr)
    if run.sched is not None:
        st.schedule = run.sched.state_dict()
    st.epoch += 1
    st.batch = 0
    st.status = budget_reached(cfg, st.step, st.epoch, run.elapsed()) or "running"
    run.save()


def _evaluate(run: Run, at_stop: bool = False) -> dict:
    """Validation errors now; logged, kept as last_eval, and saved as best.pt when the best so far."""
    _read_pending(run)  # the steps' records before the evaluation's, and no evaluation after a NaN
    st = run.state
    res = evaluate_split(run.model, run.cache, run.val_ds, run.cfg, run.rt)
    st.last_eval = res
    extra = {"at_stop": True} if at_stop else {}
    run.log(kind="eval", epoch=st.epoch, step=st.step, **extra, **res)
    if run.rt.is_main:
        log.info("%s: val top-1 err %.4f, top-5 err %.4f", f"stopped at step {st.step}" if at_stop else
                 f"epoch {st.epoch}", res["val_top1_err"], res["val_top5_err"])
    if res["val_top1_err"] < st.best.get("val_top1_err", math.inf):
        st.best = {**res, "epoch": st.epoch, "step": st.step}
        run.save_best()
    return res


def _total_steps(run: Run) -> int:
    total = run.cfg.epochs * (len(run.train_ds) // run.cfg.batch_size)
    return min(total, run.cfg.max_steps) if run.cfg.max_steps else total


def _schedule(cfg: TrainConfig):
    o = cfg.optim
    if o.schedule == "plateau":
        return PlateauSchedule(o.patience, o.factor, o.max_drops, o.min_delta)
    if o.schedule == "milestones":
        return MilestoneSchedule(o.milestones, o.factor)
    return None


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


def _has_split(cache, split: str) -> bool:
    try:
        PackedDataset(cache, split)
        return True
    except FileNotFoundError:
        return False


# ---- command line -------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (the paper's recipe; experiments/*.toml)")
    p.add_argument("--config", help="TOML file (experiments/...); default: the paper's values")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. max_steps=10 or optim.lr=0.02 (repeatable)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="RUNDIR", help="continue the run in RUNDIR (--set may change only "
                   "budgets, evaluation, logging, devices and optim.lr)")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run")
    p.add_argument("--data", help="a folder of class folders or a prepared cache (sets data.root)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    sets = list(args.sets) + ([set_item("data.root", args.data)] if args.data else [])
    if args.resume:
        summary = train(out=args.resume, resume=True, sets=sets)
    else:
        if not args.out:
            raise FileNotFoundError("train: --out RUNDIR is needed (or --resume RUNDIR)")
        summary = train(load_config(args.config, sets), args.out, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 130 if summary["status"] == "interrupted" else 0
