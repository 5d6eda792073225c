"""Progress of long steps (meter.py) and what `dpoflow run`'s terminal shows of it (pipeline/progress.py)."""

import io
import json
import time

from dpoflow.meter import Meter, duration, reporting
from dpoflow.pipeline.progress import ProgressLog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_30_s_in_the_log_and_an_event_every_10_s_with_rate_and_time_left(monkeypatch):
    monkeypatch.delenv("DPOFLOW_PROGRESS_EVERY_S", raising=False)
    clock, lines, events = Clock(), [], []
    with reporting(events.append):
        meter = Meter("dpo", 100, "steps", log=lines.append, clock=clock)
        for step in range(1, 101):
            clock.now += 4.0  # 4 s a step
            meter.to(step)
    assert len(lines) == 12 and len(events) == 33  # a step every 4 s: lines at 32, 64, ... s, events at 12, 24, ... s
    assert lines[0] == "dpo: 8/100 steps, 4 s/step, ~6m08s left"
    assert events[0] == "dpo: 3/100 steps, 4 s/step, ~6m28s left"
    assert lines[-1] == "dpo: 96/100 steps, 4 s/step, ~16s left"


def test_fast_rates_short_loops_resumed_loops_and_other_processes(monkeypatch):
    monkeypatch.delenv("DPOFLOW_PROGRESS_EVERY_S", raising=False)
    clock, lines = Clock(), []
    meter = Meter("sample (train)", 1024, "samples", log=lines.append, clock=clock)
    clock.now = 31.0
    meter.to(310.5)  # a decode loop reports parts of samples
    assert lines == ["sample (train): 310/1024 samples, 10 samples/s, ~1m11s left"]

    quick = []
    meter = Meter("score", 64, "pairs", log=quick.append, clock=clock)
    for n in range(64):
        clock.now += 0.1
        meter.to(n + 1)
    assert quick == []  # a loop shorter than the interval writes nothing

    resumed = []
    meter = Meter("sft", 300, "steps", start=200, log=resumed.append, clock=clock)
    clock.now += 40
    meter.to(220)  # the rate counts this run's steps only
    assert resumed == ["sft: 220/300 steps, 2 s/step, ~2m40s left"]

    silent = []
    meter = Meter("dpo", 10, "steps", log=silent.append, enabled=False, clock=clock)
    clock.now += 100
    meter.to(5)
    assert silent == []

    monkeypatch.setenv("DPOFLOW_PROGRESS_EVERY_S", "0")
    every = []
    meter = Meter("dpo", 3, "steps", log=every.append, clock=clock)
    for n in range(3):
        clock.now += 1
        meter.to(n + 1)
    assert len(every) == 3 and every[-1] == "dpo: 3/3 steps, 1 steps/s, ~0s left"
    assert [duration(s) for s in (0, 59.6, 61, 3599, 3600 * 2 + 61)] == ["0s", "1m00s", "1m01s", "59m59s", "2h01m"]


def test_the_terminal_shows_a_steps_progress_while_the_runner_says_nothing(tmp_path):
    events = tmp_path / "events.jsonl"
    terminal = io.StringIO()
    log = ProgressLog(tmp_path / "kfp.log", terminal, events)
    try:
        with open(events, "a") as handle:
            handle.write(json.dumps({"step": "prefs", "event": "running"}) + "\n")
            handle.write(json.dumps({"step": "prefs", "event": "progress",
                                     "text": "sample (train): 120/1024 samples, 4.1 samples/s, ~3m40s left"}) + "\n")
        deadline = time.monotonic() + 120  # the watcher looks every 2 s; generous for a loaded machine
        while "~3m40s left" not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        log.close()
    shown = terminal.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in shown] == [
        "prefs: running", "prefs: sample (train): 120/1024 samples, 4.1 samples/s, ~3m40s left"]
