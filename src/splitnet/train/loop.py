"""Training (§5): the paper's SGD on the split model, in a run directory that resumes exactly.

    train()            validate everything (config, data, model, checkpoint: start.py), then write the
                       run directory (rundir.py) and train epoch by epoch (epochs.py):
    train_one_epoch()  the SGD steps of one epoch (train_step: one batch);
    end_of_epoch()     evaluate, drop eps by the schedule, keep the best weights, checkpoint.

Where a run is lives in a TrainState (state.py) that round-trips through the checkpoint, so that
`--resume` continues with exactly the batches, dropout masks, learning rates and losses of an
uninterrupted run (bitwise on the CPU). Budgets (max_steps, max_minutes) are run totals. SIGINT and
SIGTERM finish the current step, save and exit; a NaN loss stops the run, keeping the last good
checkpoint. In fp16 a step whose gradients overflow is skipped (not applied, but counted and logged)
and the loss scale halved (scaler.py).

This module is `splitnet train` and the names the rest of the package imports (re-exported from
start.py and epochs.py).
"""
from __future__ import annotations

import json
import logging

from ..config import set_item
from .config import TrainConfig, load_config
from .epochs import Run, TrainingError, end_of_epoch, run_epochs, train_one_epoch  # noqa: F401 (Run: re-exported)
from .rundir import RunDir, RunError, read_metrics, run_done
from .runtime import make_runtime
from .start import build_run, check_input_geometry, check_same_experiment, holds_a_run, resume_config  # noqa: F401
from .step import STREAM_DROPOUT, sgd_step  # noqa: F401 (re-exported)

log = logging.getLogger("splitnet")

__all__ = ["train", "train_one_epoch", "end_of_epoch", "train_or_resume", "check_same_experiment", "read_metrics",
           "TrainingError"]


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
        cfg, ck, changes = resume_config(rundir, sets, cfg)
    elif cfg is None:
        raise ValueError("train: a config is needed unless resuming")
    else:
        ck, changes = None, {}
        if rundir.is_run() and not overwrite:
            raise holds_a_run(rundir)
    rt = make_runtime(cfg)
    failed = False
    try:
        run = build_run(cfg, rundir, ck, changes, rt, progress and rt.is_main, not resume, overwrite)
        return run_epochs(run)
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
