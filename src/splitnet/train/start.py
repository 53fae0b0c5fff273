"""A run's start: the config checks of a start or a resume, the data, model, optimiser and checkpoint
built and checked, and only then the run directory written (config.toml, run.json, the metrics' cut).

    build_run()              everything a segment needs, as an epochs.Run;
    resume_config()          the config, checkpoint and changes of a resume (nothing written);
    check_same_experiment()  a run trained with a setting that a resume may not change is refused.
"""
from __future__ import annotations

import logging
import time

import torch

from ..config import ConfigError, replace, to_dict
from ..data import PackedDataset, resolve_data
from ..data.cache import identity
from ..model.precision import memory_format, needs_loss_scaling
from ..model.placement import cudnn_autotune
from ..model.tune import calibrate, worth_calibrating
from . import checkpoint as ckpt
from .config import (TrainConfig, check_num_classes, config_changes, dump_toml, load_config, read_toml,
                     resume_changes, resume_lr, unsafe_changes)
from .epochs import Run
from .optim import MilestoneSchedule, PaperSGD, PlateauSchedule, param_groups
from .rundir import Metrics, RunDir, RunError, atomic_write_text, budget_reached, git_commit
from .scaler import LossScaler
from .state import TrainState

log = logging.getLogger("splitnet")

__all__ = ["build_run", "resume_config", "holds_a_run", "check_same_experiment", "check_input_geometry"]


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


def holds_a_run(rundir: RunDir) -> RunError:
    return RunError(f"{rundir.path} already holds a run: continue it with --resume {rundir.path}, "
                    f"start it again with --overwrite, or choose another --out")


def _saved_config(rundir: RunDir) -> tuple:
    """(config.toml as a dict, the TrainConfig it gives) of the run in `rundir`."""
    base = read_toml(rundir.config)
    return base, load_config(None, (), base=base)


def resume_config(rundir: RunDir, sets, wanted: TrainConfig | None) -> tuple:
    """(config with the resume's overrides, the checkpoint or None, {key: (old, new)} changed):
    checked, nothing written."""
    if not rundir.config.is_file():
        raise FileNotFoundError(f"{rundir.path}: not a run directory (no config.toml) to resume")
    base, saved = _saved_config(rundir)
    cfg = load_config(None, sets, base=base if wanted is None else to_dict(wanted))
    changes = resume_changes(saved, cfg)
    ck = ckpt.load(rundir.checkpoint) if rundir.checkpoint.exists() else None
    return cfg, ck, changes


def build_run(cfg: TrainConfig, rundir: RunDir, ck, changes: dict, rt, progress: bool, new_run: bool,
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
            raise holds_a_run(rundir)
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
