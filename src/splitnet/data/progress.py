"""Progress of a long count (images prepared, batches evaluated): a tqdm bar on a terminal when tqdm
is installed; otherwise plain log lines, about every 10% or 30 s (CI logs, files, no tqdm)."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("splitnet")


def _tqdm():
    """tqdm's bar class, or None: tqdm is optional (a plain line is as informative, only less pretty)."""
    try:
        from tqdm import tqdm  # here, not at the top: only a terminal gets a bar
    except ImportError:
        return None
    return tqdm


class Progress:
    """`total` things (`noun`; `unit` in rates) counted by update(); silent unless `enabled`."""

    def __init__(self, total: int, enabled: bool, desc: str = "prepare", noun: str = "images", unit: str = "img"):
        self.total, self.done = total, 0
        self.desc, self.noun, self.unit = desc, noun, unit
        self.t0 = self.last = time.monotonic()
        self.bar = None
        self.enabled = enabled and total > 0
        bar = _tqdm() if self.enabled and sys.stderr.isatty() else None
        if bar is not None:
            self.bar = bar(total=total, unit=unit, desc=desc, dynamic_ncols=True)

    def update(self, n: int, what: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if self.done == self.total or now - self.last > 30 or \
                    int(10 * self.done / self.total) > int(10 * (self.done - n) / self.total):
                rate = self.done / max(now - self.t0, 1e-9)
                log.info("%s: %d/%d %s (%.1f %s/s)%s", self.desc, self.done, self.total, self.noun, rate, self.unit,
                         f", last finished {what}" if what else "")
                self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
