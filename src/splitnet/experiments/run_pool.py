"""Training the ablation runs: one run to its end and its final evaluation (kept in the run folder),
one after another or `jobs` at once in spawned worker processes, with Ctrl-C and SIGTERM reaching
every run so that each saves (ablate.py)."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from ..config import to_dict
from ..train.config import load_config
from ..train.evaluate import evaluate_checkpoints
from ..train.loop import train_or_resume
from ..train.memory import keep_freed_memory
from ..train.rundir import atomic_write_text

FINAL_EVAL = "final_eval.json"


def train_run(cfg_dict: dict, run: str) -> str:
    """Train (or resume, or keep) one run to its end, then evaluate its final weights (final_eval);
    in a worker process under --jobs, so each run's evaluation takes its worker's core beside the
    other runs instead of this process's threads on top of them. Returns the run's status."""
    cfg = load_config(None, (), base=cfg_dict)
    status = train_or_resume(cfg, run)["status"]
    if status != "interrupted":
        try:
            final_eval(Path(run), cfg.eval_batch_size)
        except KeyboardInterrupt:  # ^C during the evaluation: the run is saved; evaluated next time
            return "interrupted"
    return status


def final_eval(run: Path, batch_size: int) -> dict:
    """{1: centre row, 10: ten-patch row} of evaluate_checkpoints for the run's final weights, computed
    once: kept in RUN/final_eval.json with the size and time stamp of the checkpoint.pt it evaluated,
    and used as long as checkpoint.pt is that file (a resume that trains on writes a new one)."""
    ck = Path(run) / "checkpoint.pt"
    st = ck.stat()
    key = {"checkpoint_bytes": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns}
    path = Path(run) / FINAL_EVAL
    kept = json.loads(path.read_text()) if path.is_file() else {}
    rows = kept["rows"] if {k: kept.get(k) for k in key} == key else None
    if rows is None:
        rows = evaluate_checkpoints([run], split="val", ten=True, batch_size=batch_size)
        atomic_write_text(path, json.dumps({**key, "rows": rows}, indent=2))
    return {r["patches"]: r for r in rows}


def train_all(tasks: list, jobs: int, on_done) -> None:
    """Train every (name, cfg, run) task; `jobs` > 1 runs that many at once in spawned processes,
    each with cores // jobs intra-op threads (small networks use two single-threaded runs better than
    one two-threaded run). on_done(name) is called in this process as each run ends."""
    if jobs <= 1:
        for name, cfg, run in tasks:
            if train_run(to_dict(cfg), str(run)) == "interrupted":
                raise KeyboardInterrupt
            on_done(name)
        return
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    queue = iter(tasks)
    with worker_pool(jobs) as pool, _sigterm_interrupts():
        # Workers lead their own process groups: a terminal's Ctrl-C reaches only this process, which
        # forwards it once below (a second SIGINT would make a run stop without saving), and a
        # `kill -INT` or a scheduler's SIGTERM sent to this process alone reaches the runs too.
        try:
            _run_pool(pool, queue, jobs, threads, on_done)
        except KeyboardInterrupt:
            for proc in multiprocessing.active_children():  # the pool's workers: this process's only children
                os.kill(proc.pid, signal.SIGINT)
            raise  # leaving the `with` waits for the runs to save


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """`jobs` spawned processes, each started by _worker_start."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_start)


def _worker_start() -> None:
    """A run's worker leads its own process group (see train_all) and takes the allocator settings
    `splitnet train` gets in cli.main: a spawned process runs none of the parent's start-up. Without
    them a CIFAR-scale step re-faulted its freed activations (about 9,000 fresh pages a step) and ran
    1.1 to 1.3x slower than the same run under `splitnet train` (docs/results.md)."""
    os.setpgrp()
    keep_freed_memory()


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt here, as SIGINT does (the default would orphan the workers)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run_pool(pool, queue, jobs: int, threads: int, on_done) -> None:
    running = {}

    def start_next() -> None:
        # One task per free worker, submitted only then: the pool queues nothing ahead, so a
        # Ctrl-C leaves no queued run to start after the interrupted ones have saved.
        for name, cfg, run in queue:
            d = to_dict(cfg)
            d["threads"] = d["threads"] or threads
            running[pool.submit(train_run, d, str(run))] = name
            return

    for _ in range(jobs):
        start_next()
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for f in done:
            name = running.pop(f)
            if f.result() == "interrupted":  # Ctrl-C reached the runs too; they have saved
                raise KeyboardInterrupt
            on_done(name)
            start_next()
