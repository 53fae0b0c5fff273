"""What a person running `splitnet train` sees and does: progress lines or a bar, and Ctrl-C / SIGTERM
that finish the current step, save and exit (epochs.py checks the flag after each step)."""
from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time

log = logging.getLogger("splitnet")


class StopFlag:
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


class Progress:
    """tqdm on a terminal; plain log lines every `every` steps otherwise (CI logs, files)."""

    def __init__(self, total: int, done: int, every: int, enabled: bool = True, max_seconds: float = 0.0):
        self.total, self.every, self.t0, self.done0 = total, every, time.time(), done
        self.max_seconds = max_seconds  # a time cap (max_minutes) bounds the time left too
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # here, not at the top: only a terminal gets a bar
            except ImportError:  # tqdm is optional: plain lines instead
                tqdm = None
            if tqdm is not None:
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
