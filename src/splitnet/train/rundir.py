"""A run directory: what a training run keeps on disk, and the rules for reading it back.

  config.toml      the resolved config the model was built with (paper defaults + experiment file + --set)
  run.json         provenance: data set, classes, layout, and one entry per segment (each start or
                   resume: commit, devices, threads, start and end time, steps, how it ended)
  metrics.jsonl    one JSON object per line: {"kind": "train", step, epoch, loss, lr, ...} per step,
                   {"kind": "eval", epoch, step, val_top1_err, val_top5_err} per evaluation
  checkpoint.pt    the last checkpoint (checkpoint.py: atomic, weights_only loadable)
  best.pt          the weights of the best validation evaluation so far
  .lock            held (flock) by the one process training into the folder
  final_eval.json  (`ablate` only) the final weights' centre and ten-patch errors, with the
                   checkpoint.pt they were computed from (experiments/run_pool.py: final_eval)

Writes are atomic (temporary file, then rename), so a kill at any moment leaves the last complete
version of each file; the temporaries a kill leaves behind are removed at the next start.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import time
from pathlib import Path

from ..data.cache import identity, identity_changes
from . import checkpoint as ckpt
from .errors import RunError, RunLockedError, write_failure

log = logging.getLogger("splitnet")

RUN_FILES = ("config.toml", "run.json", "metrics.jsonl", "checkpoint.pt", "best.pt")
__all__ = ["RunDir", "RunError", "RunLockedError", "Metrics", "read_metrics", "budget_reached", "run_done"]


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


def atomic_write_text(path: Path, text: str) -> None:
    """`text` to a temporary file, renamed over `path`; a RunError naming the file when the write
    fails (a full disk, a read-only folder), `path` as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise RunError(f"could not write {path} ({write_failure(e)}); it is as it was") from None
    finally:
        with contextlib.suppress(OSError):  # a read-only folder refuses this too: the first error counts
            tmp.unlink(missing_ok=True)


class RunDir:
    """Paths and file rules of one run directory (nothing is created until a run starts)."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():  # else a FileExistsError traceback at mkdir
            raise NotADirectoryError(f"{self.path} is a file, not a run directory: choose another folder")
        self.config = self.path / "config.toml"
        self.info = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.best = self.path / "best.pt"
        self._lock_file = None

    def is_run(self) -> bool:
        """Holds a run (started, maybe never checkpointed)."""
        return any((self.path / f).exists() for f in RUN_FILES)

    def lock(self) -> "RunDir":
        """Take the folder's lock (released when the process ends or at unlock()); a second
        `splitnet train` on the same folder stops here, naming the holder."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(f"{self.path} is in use by {holder}: one `splitnet train` per run "
                                 f"directory at a time") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._lock_file = f
        return self

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def clean_temporaries(self) -> list:
        """Remove the temporary files of writes a kill cut short (`.NAME.tmp-PID`); returns their names."""
        gone = []
        for p in self.path.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            gone.append(p.name)
        return gone

    def remove_run(self) -> None:
        """--overwrite: delete the run's files (only those; anything else in the folder stays)."""
        for f in RUN_FILES:
            (self.path / f).unlink(missing_ok=True)

    def what_is_kept(self) -> str:
        """For the message of a run stopped by an error: the checkpoint it can go on from, or, where
        none was written, how to start it again (the folder holds a run: --out alone refuses it)."""
        try:
            step = int(ckpt.load(self.checkpoint)["step"])
        except (FileNotFoundError, ValueError):
            return (f"No checkpoint was written yet: start again with --overwrite, or delete {self.path}")
        return f"The last good checkpoint ({self.checkpoint}, step {step}) is kept"

    def data_changes(self, cache) -> str | None:
        """How the data in `cache` differs from what run.json says the run was trained on
        (cache.identity_changes), or None: the same, or a run from before identities were recorded."""
        return identity_changes(self.read_info().get("data_identity"), identity(cache))

    def check_same_data(self, cache) -> None:
        """A resume trains on the data the run was trained on: else a RunError naming the difference."""
        changed = self.data_changes(cache)
        if changed:
            raise RunError(f"{self.path} was trained on other data than {cache} holds now ({changed}); "
                           f"resuming would go on with other images. Restore that data, or start a new run (--out)")

    def start_segment(self, static: dict, segment: dict) -> None:
        """run.json: `static` (data, classes, layout, ...) and one more segment in its history."""
        old = self.read_info()
        segments = old.get("segments", [])
        info = {**static, **segment, "segments": segments + [segment]}
        atomic_write_text(self.info, json.dumps(info, indent=2))

    def end_segment(self, **fields) -> None:
        """Record how the segment ended, as well as can be: it runs as a run stops, often because of
        an error (a full disk) whose message must not give way to this write's."""
        info = self.read_info()
        if info.get("segments"):
            info["segments"][-1].update(fields, ended=time.strftime("%Y-%m-%d %H:%M:%S"))
            try:
                atomic_write_text(self.info, json.dumps(info, indent=2))
            except RunError as e:
                log.warning("train: the end of this segment is not recorded: %s", e)

    def read_info(self) -> dict:
        try:
            return json.loads(self.info.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


class Metrics:
    """metrics.jsonl: appended line by line and flushed, so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a")

    def write(self, **rec) -> None:
        try:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        except OSError as e:
            raise RunError(f"could not append to {self.path} ({write_failure(e)}); stopped, the last "
                           f"checkpoint is kept") from None

    def close(self):
        with contextlib.suppress(OSError):  # a line that could not be written was reported by write()
            self.f.close()

    @staticmethod
    def truncate_to(path: Path, step: int, epoch: int) -> None:
        """Drop lines a resumed run will write again (train steps after `step`, evals of epochs >=
        `epoch`, lines a kill cut short), atomically: a kill during this leaves the old file."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == "eval" and r.get("epoch", 0) >= epoch:
                continue
            if r.get("kind") == "train" and r.get("step", 0) > step:
                continue
            keep.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in keep))


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line a kill cut short
    return out


def budget_reached(cfg, step: int, epoch: int, elapsed_s: float, steps: bool = True) -> str | None:
    """The one rule for "this run has done what its config asks": "finished" (all epochs),
    "max_steps" or "max_minutes" (a budget, counted over every segment of the run), else None.
    steps=False: not max_steps (the loop checks it before taking a batch)."""
    if epoch >= cfg.epochs:
        return "finished"
    if steps and cfg.max_steps and step >= cfg.max_steps:
        return "max_steps"
    if cfg.max_minutes and elapsed_s >= 60 * cfg.max_minutes:
        return "max_minutes"
    return None


def budget_fraction(cfg, step: int, elapsed_s: float) -> float:
    """How much of the run's budget is spent, 0..1: the larger of the step and time fractions (0
    when the run has neither budget)."""
    parts = [step / cfg.max_steps] if cfg.max_steps else []
    if cfg.max_minutes:
        parts.append(elapsed_s / (60 * cfg.max_minutes))
    return max(parts, default=0.0)


def run_done(run_dir, cfg) -> bool:
    """A run is done when its last checkpoint reached what `cfg` asks (budget_reached): a run that
    stopped at its time or step budget is done, and is not trained again."""
    run = RunDir(run_dir)
    if not run.checkpoint.exists():
        return False
    ck = ckpt.load(run.checkpoint)
    st = ck.get("state", {})
    elapsed = float(st.get("elapsed_s", 0.0))
    if "elapsed_s" not in st and any(m.get("at_stop") for m in read_metrics(run.path) if m["kind"] == "eval"):
        return True  # a checkpoint from before elapsed time was recorded, stopped by a budget
    return budget_reached(cfg, int(ck["step"]), int(ck["epoch"]), elapsed) is not None
