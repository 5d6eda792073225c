"""MLflow tracking: the only module that imports mlflow (mlflow_registry.py goes through it).

Tracking URI from MLFLOW_TRACKING_URI, else the local sqlite default (artifacts in ./mlartifacts).
Run tree of a pipeline run: one parent run (the one a KFP >= 2.17 server injects as MLFLOW_RUN_ID,
or one dpoflow creates) and one nested run per β, opened by the DPO task (live training metrics,
system metrics) and completed by the eval and register tasks. Models are logged as plain
`save_pretrained` folders and registered by artifact location (mlflow_registry.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from dpoflow.redact import redact

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
# MLflow's REST client retries a failed request for minutes by default; a tracking server that is
# down must not hold a step that long (metrics are buffered and retried by LiveMetrics instead)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def load_mlflow():
    import mlflow

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def client():
    return load_mlflow().MlflowClient()


def check_reachable(timeout_s: float = 10.0) -> None:
    """Fail fast (well under 30 s) when a tracking server does not answer, naming its URI."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as error:
        raise TrackingError(f"the MLflow tracking server at {uri} does not answer ({type(error).__name__}): start it, "
                            "fix MLFLOW_TRACKING_URI, or set tracking.enabled=false") from None


def experiment_id(mlflow, name: str) -> str:
    """The experiment to log to: the one KFP injected (MLFLOW_EXPERIMENT_ID) when this store has it,
    else `name`, created if needed; a local store keeps its artifacts in ./mlartifacts rather than
    MLflow's default ./mlruns. (mlflow.set_experiment is avoided: it exports MLFLOW_EXPERIMENT_ID,
    which would leak into the next store this process talks to.)"""
    injected = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if injected:
        try:
            return mlflow.MlflowClient().get_experiment(injected).experiment_id
        except Exception:  # not in this store: fall back to the named experiment
            pass
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = not tracking_uri().startswith(("http://", "https://"))
    return mlflow.create_experiment(name, artifact_location=Path("mlartifacts").resolve().as_uri() if local else None)


# a write that lost a race to insert the same row (sqlite, PostgreSQL, MySQL backends)
LOST_RACE = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def retrying(fn, *args, attempts: int = 6, upsert: bool = False, **kwargs):
    """Call fn, retrying sqlite's 'database is locked' (parallel β tasks share one sqlite file). With
    upsert=True fn is an insert-or-update, and losing the race to insert (two β tasks setting the same
    alias at once: MLflow reads "no row", then both insert) is retried too: the retry updates the row."""
    retried = ("database is locked", *(LOST_RACE if upsert else ()))
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if not any(text in str(error) for text in retried) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


def git_sha() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _log_params(c, run_id: str, params: dict) -> None:
    """Params as MLflow strings (lists and dicts as JSON), at most 100 per call as MLflow requires."""
    from mlflow.entities import Param

    items = [Param(k, redact(json.dumps(v) if isinstance(v, list | dict) else str(v))) for k, v in params.items()]
    for start in range(0, len(items), 100):
        retrying(c.log_batch, run_id, params=items[start:start + 100])


# ---- runs -------------------------------------------------------------------------------------

def start_parent_run(experiment: str, run_name: str) -> str:
    """The pipeline run's parent: MLFLOW_RUN_ID when a KFP server injected one, else a new run."""
    injected = os.environ.get("MLFLOW_RUN_ID")
    if injected:
        return injected
    mlflow = load_mlflow()
    run = retrying(mlflow.MlflowClient().create_run, experiment_id(mlflow, experiment), run_name=run_name,
                   tags={"dpoflow.git_sha": git_sha() or "unknown"})
    return run.info.run_id


def log_parent(run_id: str, *, params: dict, tags: dict, artifacts=()) -> None:
    """Params (the flattened config), lineage tags and artifacts, on the parent run."""
    mlflow = load_mlflow()
    c = mlflow.MlflowClient()
    existing = c.get_run(run_id).data.params
    from mlflow.entities import RunTag

    _log_params(c, run_id, {k: v for k, v in params.items() if k not in existing})  # a param cannot change
    retrying(c.log_batch, run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])
    for path in artifacts:
        if Path(path).exists():
            retrying(c.log_artifact, run_id, str(path))


def log_dataset(run_id: str, parquet: Path, *, name: str, digest: str) -> None:
    """The training pairs as the run's dataset input; its digest is the data md5 (DVC's when from DVC)."""
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    mlflow = load_mlflow()
    source = mlflow.data.from_pandas(pd.read_parquet(parquet), source=str(Path(parquet).resolve()), name=name,
                                     digest=digest[:36])
    inputs = [DatasetInput(source._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])]
    # two β tasks may register the same dataset at once: the loser's retry links the stored one
    retrying(mlflow.MlflowClient().log_inputs, run_id, datasets=inputs, upsert=True)


def start_child_run(parent_id: str, name: str, *, params: dict, tags: dict) -> str:
    """A nested run under the pipeline's parent (the β run), with the params a comparison needs."""
    c = client()
    parent = c.get_run(parent_id)
    run = retrying(c.create_run, parent.info.experiment_id, run_name=name,
                   tags={"mlflow.parentRunId": parent_id, **{k: redact(str(v)) for k, v in tags.items()}})
    _log_params(c, run.info.run_id, params)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    retrying(client().set_terminated, run_id, status=status)


def log_metrics(run_id: str, metrics: dict, step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    retrying(client().log_batch, run_id, metrics=[Metric(k, v, now, step) for k, v in numeric(metrics).items()])


def log_metric_history(run_id: str, metrics_jsonl: Path) -> int:
    """Log every line of a step's metrics.jsonl (a reused step, or a replay after the server was down)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        record = json.loads(line)
        metrics += [Metric(k, v, now, record["step"]) for k, v in numeric(record).items() if k != "step"]
    for start in range(0, len(metrics), 1000):
        retrying(client().log_batch, run_id, metrics=metrics[start:start + 1000])
    return len(metrics)


def log_artifacts(run_id: str, paths, artifact_path: str | None = None) -> None:
    c = client()
    for path in paths:
        path = Path(path)
        if path.is_dir():
            retrying(c.log_artifacts, run_id, str(path), artifact_path)
        elif path.exists():
            retrying(c.log_artifact, run_id, str(path), artifact_path)


def set_tags(run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    retrying(client().log_batch, run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])


class LiveMetrics:
    """Training metrics to MLflow while the step runs: `__call__` only appends to a buffer (the
    training thread never waits on the network); a daemon thread sends the buffer every
    `flush_every_s`. A failed send keeps the metrics and retries at the next flush, so a tracking
    server that goes away and comes back gets every metric; `close()` makes a last attempt and
    returns what could not be recorded (also written to `unrecorded_path`)."""

    def __init__(self, run_id: str, flush_every_s: float = 5.0, unrecorded_path: Path | None = None,
                 system_metrics: bool = False):
        self.run_id, self.flush_every_s, self.unrecorded_path = run_id, flush_every_s, unrecorded_path
        self.buffer: list = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failures = 0
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=flush_every_s, tracking_uri=tracking_uri())
            self.monitor.start()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="dpoflow-live-metrics")
        self.thread.start()

    def __call__(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self.lock:
            self.buffer += [Metric(k, v, now, step) for k, v in numeric(metrics).items()]

    def flush(self) -> bool:
        with self.lock:
            pending, self.buffer = self.buffer, []
        if not pending:
            return True
        sent = 0
        try:
            while sent < len(pending):  # MLflow takes at most 1000 metrics per batch
                retrying(client().log_batch, self.run_id, metrics=pending[sent:sent + 1000])
                sent += 1000
            return True
        except Exception:
            self.failures += 1
            with self.lock:  # keep the unsent ones, oldest first, for the next attempt
                self.buffer = pending[sent:] + self.buffer
            return False

    def _loop(self) -> None:
        while not self.stop.wait(self.flush_every_s):
            self.flush()

    def close(self, attempts: int = 3) -> int:
        """Stop the thread, send what is left; return how many metric values were not recorded."""
        self.stop.set()
        self.thread.join()
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:
                pass
        for attempt in range(attempts):
            if self.flush():
                return 0
            time.sleep(1 + attempt)
        lost = self.buffer
        if self.unrecorded_path is not None:
            with open(self.unrecorded_path, "a") as handle:
                for m in lost:
                    handle.write(json.dumps({"key": m.key, "value": m.value, "step": m.step}) + "\n")
        return len(lost)


def search_runs(experiment: str, max_results: int = 50) -> list:
    mlflow = load_mlflow()
    experiment_obj = mlflow.get_experiment_by_name(experiment)
    if experiment_obj is None:
        return []
    return mlflow.MlflowClient().search_runs([experiment_obj.experiment_id], max_results=max_results,
                                             order_by=["attributes.start_time DESC"])
