"""Progress of a long loop where its user looks: done / total, the rate and the time left.

A line in the step's own output every LOG_EVERY_S (what a task's log holds: kfp.log, a Kubeflow pod's
log; never a line per tick), and, while `dpoflow run` runs the step (reuse.run_step), an event every
EVENT_EVERY_S that its terminal prints on the step's line (pipeline/progress.py). On a terminal,
tqdm's bar as well. DPOFLOW_PROGRESS_EVERY_S, when set, replaces both intervals (tests use 0).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

LOG_EVERY_S, EVENT_EVERY_S = 30.0, 10.0
_emit = None  # the running step's event writer (`reporting`)


@contextmanager
def reporting(emit):
    """Meters made inside also hand their line to `emit(text)`, at most every EVENT_EVERY_S."""
    global _emit
    previous, _emit = _emit, emit
    try:
        yield
    finally:
        _emit = previous


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Meter:
    """`what: done/total unit, rate, ~time left` of one loop; `to(done)` after each piece of work
    (fractions allowed: a decode loop reports its tokens as parts of samples). `enabled=False` on all
    but one process of a distributed job."""

    def __init__(self, what: str, total: float, unit: str, *, start: float = 0, log=print, enabled: bool = True,
                 clock=time.monotonic):
        every = os.environ.get("DPOFLOW_PROGRESS_EVERY_S")
        self.log_every, self.event_every = (float(every), float(every)) if every else (LOG_EVERY_S, EVENT_EVERY_S)
        self.what, self.total, self.unit, self.log, self.enabled, self.clock = what, total, unit, log, enabled, clock
        self.start = self.done = start
        self.t0 = self.logged = self.reported = clock()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=what, unit=unit.removesuffix("s"), leave=False)

    def advance(self, n: float = 1) -> None:
        self.to(self.done + n)

    def to(self, done: float) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        if not self.enabled:
            return
        now = self.clock()
        if now - self.logged >= self.log_every:
            self.logged = now
            self.log(self.line(now))
        if _emit is not None and now - self.reported >= self.event_every:
            self.reported = now
            _emit(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        text = f"{self.what}: {self.done:.0f}/{self.total:.0f} {self.unit}"
        if rate > 0:
            pace = f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit.removesuffix('s')}"
            text += f", {pace}, ~{duration((self.total - self.done) / rate)} left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
