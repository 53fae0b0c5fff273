"""A run's epochs (§5): the SGD steps, the evaluations, the schedule's drops and the checkpoints.

    Run                what one segment of a run works with (built by start.build_run);
    run_epochs()       epochs until the config's end, a budget, a signal or an error;
    train_one_epoch()  the SGD steps of one epoch (train_step: one batch);
    end_of_epoch()     evaluate, drop eps by the schedule, keep the best weights, checkpoint.

The step itself is train/step.py's sgd_step, the one the benchmarks time. Its loss and training
error stay on the device and are read every log_every steps (_read_pending), so the host can queue
the next step while a GPU works: a NaN loss stops the run at that read, at most log_every - 1 steps
after the step it names, and always before anything is evaluated or checkpointed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import to_dict
from ..data import LoaderSpec, PackedDataset
from ..model.precision import memory_format, numerics
from . import checkpoint as ckpt
from .config import TrainConfig
from .evaluate import evaluate_split, input_batches
from .optim import PaperSGD, drop_lr
from .progress import Progress, StopFlag
from .rundir import Metrics, RunDir, budget_fraction, budget_reached
from .scaler import LossScaler
from .state import TrainState
from .step import host_floats, sgd_step

log = logging.getLogger("splitnet")

__all__ = ["Run", "TrainingError", "run_epochs", "train_one_epoch", "train_step", "end_of_epoch"]


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, ...); the last good checkpoint is kept."""


@dataclass
class Run:
    """What one segment of a run (a start or a resume) works with; built by build_run()."""

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


def run_epochs(run: Run) -> dict:
    """Epochs until the config's end or a budget, a signal or an error stops the run."""
    cfg, st = run.cfg, run.state
    status = budget_reached(cfg, st.step, st.epoch, run.elapsed0)
    worked = status is None  # a resume of a run that is already done trains and writes nothing
    run.bar = Progress(_total_steps(run), st.step, cfg.log_every, run.progress and worked,
                       max(0.0, 60 * cfg.max_minutes - run.elapsed0) if cfg.max_minutes else 0.0)
    try:
        with run.stop, numerics(cfg.precision):
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
    spec = LoaderSpec("train", cfg.batch_size, cfg.seed, st.epoch, train=True, start_batch=st.batch,
                      share=None if rows == cfg.batch_size else (offset, rows))
    loader = input_batches(run.model, run.cache, spec, cfg, run.train_ds)
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
