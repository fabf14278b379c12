"""Progress lines for the long steps (pretraining, scans, feature extraction, probes,
fine-tuning, SVM searches): plain text, one line at a time, rank 0 only.

A line reads

    pretrain: step 705/3744 (19%) | epoch 3.00 | loss 410.2 | pairs/s 2011 | 2m10s, ~9m20s left

Lines are ordinary flushed lines whether or not stdout is a terminal: a log file (DVC's,
a batch scheduler's) gets a handful of readable lines, never a progress bar's carriage
returns. ``update`` prints at most one line per ``every_s`` seconds, and always the last
one (done == total); ``line`` prints unconditionally (pretraining's end of epoch);
``finish`` prints the final position unless that line is already out.

Time left is the rate measured since this object was created, applied to what remains:
    left = elapsed · (total − done) / (done − start)
so a resumed run (``start`` = the resumed position) does not count the steps it skipped.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from barlow.launch import launched_rank


def duration(seconds: float) -> str:
    """``seconds`` as 45s, 3m05s or 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


class Progress:
    """Progress of ``name`` through ``total`` units (``unit``: "step", "epoch", "batch",
    "image", "class"); ``total`` None when unknown (no percentage, no time left).

    ``enabled`` defaults to "this process is rank 0 of torchrun's group, or alone", so
    every rank may create and update the same Progress and only one prints."""

    def __init__(self, name: str, total: int | None, unit: str, *, start: int = 0,
                 every_s: float = 10.0, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.name, self.total, self.unit, self.start = name, total, unit, start
        self.every_s = every_s
        self.enabled = launched_rank() == 0 if enabled is None else enabled
        self.stream = stream
        self.began = self.last = time.perf_counter()
        self.shown: int | None = None

    def update(self, done: int, **fields: object) -> None:
        """A line if ``every_s`` passed since the last one, or if ``done`` is the total."""
        now = time.perf_counter()
        if done == self.total or now - self.last >= self.every_s:
            self.line(done, **fields)

    def finish(self, done: int, **fields: object) -> None:
        """The final line, unless the last line printed was already at ``done``."""
        if self.shown != done:
            self.line(done, **fields)

    def line(self, done: int, **fields: object) -> None:
        """A line now: position, ``fields`` as "key value", elapsed and time left."""
        if not self.enabled:
            return
        now = time.perf_counter()
        self.last, self.shown = now, done
        elapsed = now - self.began
        where = f"{self.unit} {done}"
        parts = []
        if self.total:
            where += f"/{self.total} ({100 * done // self.total}%)"
        parts.extend(f"{key.replace('_', ' ')} {_value(v)}" for key, v in fields.items())
        timing = duration(elapsed)
        if self.total and done > self.start:
            if done < self.total:
                left = elapsed * (self.total - done) / (done - self.start)
                timing += f", ~{duration(left)} left"
            else:
                timing += ", done"
        print(" | ".join([f"{self.name}: {where}", *parts, timing]),
              file=self.stream or sys.stdout, flush=True)
