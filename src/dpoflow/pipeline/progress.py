"""What `dpoflow run` shows: one terminal line per task and per step event while the runner's own
log goes to kfp.log (secrets masked), the failed task's error, and the summary at the end (the
registry's state read back from the registry)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from dpoflow.config import Config
from dpoflow.redact import redact

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_LINE = re.compile(r"(Executing task|Task) '([\w\-]+)'(?: finished with status (\w+))?")
ERROR_LINE = re.compile(r"^\s*([\w.]*(Error|Exception)): (.*)$")



class ProgressLog:
    """sys.stdout while the runner runs: everything goes to the log file; task starts/ends (kfp's
    lines) and the steps' events (reuse.step_event, in `events` when the tasks share the run folder)
    become one line each on the terminal."""

    def __init__(self, path: Path, terminal, events: Path | None = None):
        self.file, self.terminal, self.lock = open(path, "a"), terminal, threading.Lock()
        self.pending, self.started, self.tasks, self.t0 = "", {}, [], time.perf_counter()
        self.ran, self.reused, self.seconds = [], [], {}
        self.events, self.events_read = events, events.stat().st_size if events and events.exists() else 0
        if events is not None:  # a long step's progress shows while the runner itself says nothing
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.file.closed:
            time.sleep(2)
            with self.lock:
                if not self.file.closed:
                    self._step_events()
                    self.terminal.flush()

    def write(self, text: str) -> int:
        with self.lock:  # whole lines, secrets masked (a task that prints a credential leaks nothing)
            if self.file.closed:  # a logging handler kfp installed outlives the run: nothing to record
                return len(text)
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                line = redact(line)
                self.file.write(line + "\n")
                self._line(ANSI.sub("", line))
        return len(text)

    def _step_events(self) -> None:
        """The steps' events written since the last look (whole lines only)."""
        if self.events is None or not self.events.exists():
            return
        with open(self.events) as handle:
            handle.seek(self.events_read)
            text = handle.read()
        complete = text[:text.rfind("\n") + 1]
        self.events_read += len(complete.encode())
        elapsed = time.perf_counter() - self.t0
        for event in map(json.loads, complete.splitlines()):
            name, what = event["step"], event["event"]
            if what == "finished":
                self.seconds[name] = event["seconds"]
                continue
            if what == "progress":
                self.terminal.write(f"[{elapsed:7.1f}s] {name}: {event['text']}\n")
                continue
            (self.ran if what == "running" else self.reused).append(name)
            self.terminal.write(f"[{elapsed:7.1f}s] {name}: {what}\n")

    def _line(self, line: str) -> None:
        elapsed = time.perf_counter() - self.t0
        self._step_events()
        task = TASK_LINE.search(line)
        if task and task.group(1) == "Executing task":
            self.started.setdefault(task.group(2), []).append(time.perf_counter())
        elif task and task.group(3):  # parallel β tasks share a name: first started, first finished
            starts = self.started.get(task.group(2)) or [time.perf_counter()]
            seconds = time.perf_counter() - starts.pop(0)
            self.tasks.append({"task": task.group(2), "status": task.group(3).lower(), "seconds": round(seconds, 1)})
            self.terminal.write(f"[{elapsed:7.1f}s] task {task.group(2)}: {task.group(3).lower()} "
                                f"({seconds:.1f}s)\n")
        self.terminal.flush()

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        with self.lock:
            self._step_events()
            if self.pending:
                self.file.write(redact(self.pending))
            self.file.close()


def first_error(log_path: Path) -> str:
    """The last exception line the failed task printed (what a user needs), else ''."""
    found = ""
    for line in log_path.read_text(errors="replace").splitlines():
        match = ERROR_LINE.match(ANSI.sub("", line))
        if match and "Traceback" not in line:
            found = f"{match.group(1)}: {match.group(3)}"
    return found


def registry_summary(model_name: str, parent_run_id: str) -> dict:
    """What this run did in the registry, read back from the registry itself."""
    from dpoflow import mlflow_registry

    versions = mlflow_registry.model_versions(model_name)
    mine = [v for v in versions if v["tags"].get("dpoflow.parent_run_id") == parent_run_id]
    selected = next((v for v in versions if v["tags"].get("dpoflow.selected_in") == parent_run_id), None)
    aliases = {alias: (mlflow_registry.version_by_alias(model_name, alias) or {}).get("version")
               for alias in ("candidate", "champion", "previous-champion")}
    return {"model_name": model_name,
            "candidates": {f"beta-{v['tags'].get('dpoflow.beta')}": v["version"] for v in mine},
            "selected_version": selected["version"] if selected else None,
            "gate": selected["tags"].get("dpoflow.gate") if selected else None,
            "gate_reasons": selected["tags"].get("dpoflow.gate_reasons") if selected else None,
            "aliases": aliases}


def print_summary(cfg: Config, root: Path, summary: dict, log) -> None:
    nan = float("nan")
    log(f"\nrun {cfg.run.name}: outputs in {root} ({summary['wall_s']:.0f} s)")
    data = summary["data"]
    quarantined = sum(data["quarantined"].values())
    reasons = ", ".join(f"{r} x{n}" for r, n in sorted(data["quarantined"].items(), key=lambda item: -item[1])[:3])
    log(f"  data: {data['rows_in']} rows in, {data['kept']} kept, {quarantined} quarantined"
        + (f" ({reasons}) -> {root / 'data' / 'quarantine.jsonl'}" if quarantined else ""))
    for name, m in summary["results"].items():
        log(f"  {name}: win rate {m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}] over "
            f"{m['n_prompts']} prompts; reward margin {m.get('reward_margin', nan):+.3f}; KL {m['kl']:.2f}; "
            f"implicit accuracy {m.get('implicit_accuracy', nan):.3f}; distinct-2 {m.get('distinct_2_policy', nan):.3f} "
            f"(reference {m.get('distinct_2_reference', nan):.3f}) -> {summary['policies'][name]}"
            + (f"\n    STOPPED: {m['stopped']}" if m.get("stopped") else ""))
    log(f"  reports: {root / 'eval'}/<beta>/report.html; frontier: {root / 'frontier' / 'frontier.html'}")
    log(f"  summary: {root / 'summary.json'}")
    registry = summary.get("registry")
    if registry:
        aliases = registry["aliases"]
        log(f"  registry: {registry['model_name']} candidates {registry['candidates']}; selected "
            f"v{registry['selected_version']}; gate {registry['gate']}: {registry['gate_reasons']}")
        log(f"  champion: models:/{registry['model_name']}@champion = "
            + (f"v{aliases['champion']}" if aliases["champion"] else "none yet")
            + (f" (previous-champion v{aliases['previous-champion']})" if aliases["previous-champion"] else ""))
    if "mlflow_run_id" in summary:
        log(f"  MLflow: run {summary['mlflow_run_id']} in experiment '{cfg.tracking.experiment}'; browse with "
            f"`mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}`")
