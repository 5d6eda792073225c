"""MLflow tracking against a real `mlflow server` started on loopback by the test: metrics visible
while a step runs, a server that goes away mid-run and comes back loses nothing, an unreachable
server fails fast with its URI."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # ~15 s on 2 cores: poll, never a fixed sleep
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return process
        except requests.RequestException:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("mlflow server did not start")


def stop_server(process: subprocess.Popen) -> None:
    import os
    import signal

    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_unreachable_server_fails_fast_naming_the_uri(monkeypatch, tmp_path):
    from dpoflow.tracking import TrackingError, check_reachable

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"the MLflow tracking server at {uri} does not answer"):
        check_reachable()
    assert time.monotonic() - started < 30
    result = subprocess.run([str(BIN / "dpoflow"), "run", "--set", f"run.output_dir={tmp_path}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{BIN}:/usr/bin:/bin", "MLFLOW_TRACKING_URI": uri, "HOME": str(tmp_path)})
    assert result.returncode == 1 and uri in result.stderr and "tracking.enabled=false" in result.stderr


@pytest.mark.slow
def test_sqlite_locked_is_retried_with_backoff(monkeypatch, tmp_path):
    """A real lock: another connection holds the MLflow sqlite file EXCLUSIVE for longer than the
    busy wait MLflow sets (20 s), so the first write fails 'database is locked'; `retrying` backs off
    and the second attempt lands once the holder lets go. Other errors are not retried."""
    import sqlite3

    from dpoflow import tracking
    from dpoflow.tracking import retrying

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    run = tracking.start_parent_run("locked", "p")
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def release_after(seconds):
        time.sleep(seconds)
        holder.execute("COMMIT")
        released.set()

    attempts, errors = [], []

    def log():
        attempts.append(time.monotonic())
        try:
            return tracking.client().log_metric(run, "loss", 1.0, step=1)
        except Exception as error:
            errors.append(str(error))
            raise

    threading.Thread(target=release_after, args=(21.0,), daemon=True).start()
    started = time.monotonic()
    retrying(log)
    assert released.is_set() and time.monotonic() - started >= 21.0
    assert len(attempts) == 2 and "database is locked" in errors[0]
    assert attempts[1] - attempts[0] >= 20.0 + 0.2  # MLflow's busy wait, then the first backoff
    assert [(m.step, m.value) for m in tracking.client().get_metric_history(run, "loss")] == [(1, 1.0)]
    with pytest.raises(ValueError, match="other"):
        retrying(lambda: (_ for _ in ()).throw(ValueError("other")))  # other errors are not retried


@pytest.mark.slow
@pytest.mark.faults
def test_live_metrics_and_a_server_restart_mid_run(tmp_path, monkeypatch, tiny_model_dir, pairs_dir):
    from mlflow import MlflowClient

    from dpoflow import tracking
    from dpoflow.config import DpoConfig
    from dpoflow.dpo.train import run_dpo

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    server = start_server(tmp_path, port)
    try:
        client = MlflowClient(uri)
        parent = tracking.start_parent_run("live", "pipeline")
        run_id = tracking.start_child_run(parent, "beta-0.1", params={"dpo.beta": 0.1}, tags={})
        live = tracking.LiveMetrics(run_id, flush_every_s=0.3, unrecorded_path=tmp_path / "unrecorded.jsonl")
        seen_during_training = []

        def log_metrics(step, metrics):
            live(step, metrics)
            if step == 3:  # still inside the training loop: the first steps must already be in MLflow
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not seen_during_training:
                    seen_during_training.extend(m.step for m in client.get_metric_history(run_id, "loss"))
                    time.sleep(0.2)

        cfg = DpoConfig(max_steps=6, per_device_batch_size=4, log_every=1, reference="live", learning_rate=1e-3)
        run_dpo(cfg, pairs_dir, tiny_model_dir, tmp_path / "dpo", log_metrics=log_metrics)
        assert seen_during_training and max(seen_during_training) <= 3

        # the server goes away while training goes on: logging never blocks or raises
        stop_server(server)
        started = time.monotonic()
        for step in range(7, 31):
            live(step, {"loss": 0.5 - step / 100, "rewards/margins": step / 10})
            time.sleep(0.05)
        assert time.monotonic() - started < 5  # 24 calls with the server down did not wait on the network
        deadline = time.monotonic() + 30
        while live.failures < 1 and time.monotonic() < deadline:  # a send failed: the metrics stay buffered
            time.sleep(0.2)
        assert live.failures >= 1
        server = start_server(tmp_path, port)  # back (same store): the buffer is replayed
        assert live.close() == 0
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 31))
        assert not (tmp_path / "unrecorded.jsonl").exists()

        # a server that never comes back: close() says how many values were not recorded, and where
        lost = tracking.LiveMetrics(run_id, flush_every_s=60, unrecorded_path=tmp_path / "unrecorded.jsonl")
        stop_server(server)
        server = None
        lost(99, {"loss": 0.1})
        assert lost.close(attempts=1) == 1
        assert '"step": 99' in (tmp_path / "unrecorded.jsonl").read_text()
    finally:
        if server is not None:
            stop_server(server)


@pytest.mark.slow
def test_live_metrics_buffer_is_thread_safe_and_ordered(monkeypatch, tmp_path):
    """Against the default sqlite store: four producer threads at once, flushes every 10 ms, and a
    real lock held on the database longer than MLflow's busy wait (20 s: a flush fails and keeps its
    metrics): every value arrives, each key's history in the order it was produced (MLflow returns
    it by timestamp, step: the time a value was produced, not sent)."""
    import sqlite3

    from mlflow import MlflowClient

    from dpoflow import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent_run("live", "p")
    live = tracking.LiveMetrics(parent, flush_every_s=0.01)
    monkeypatch.setattr(tracking, "retrying", lambda fn, *a, **k: fn(*a, **k))  # a locked flush fails at once
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=30, check_same_thread=False)

    def produce(key):
        for step in range(1, 201):
            live(step, {key: float(step)})
            if step == 100 and key == "t0":  # hold the database while the others keep producing
                holder.execute("BEGIN EXCLUSIVE")
                time.sleep(21.0)
                holder.execute("COMMIT")
            time.sleep(0.001)

    producers = [threading.Thread(target=produce, args=(f"t{i}",)) for i in range(4)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join()
    assert live.close() == 0
    assert live.failures >= 1  # the held lock made at least one flush fail
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for i in range(4):
        assert [(m.step, m.value) for m in history.get_metric_history(parent, f"t{i}")] == \
            [(s, float(s)) for s in range(1, 201)], f"t{i}"


def test_runs_table_and_compare(monkeypatch, tmp_path):
    from dpoflow import tracking
    from dpoflow.runs import compare_runs, runs_table

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent_run("dpoflow", "pipeline")
    ids = {}
    for beta, win in ((0.1, 0.80), (0.5, 0.93)):
        ids[beta] = tracking.start_child_run(parent, f"beta-{beta}", params={"dpo.beta": beta, "dpo.loss_type": "sigmoid"},
                                             tags={})
        tracking.log_metrics(ids[beta], {"eval/win_rate": win, "eval/kl": 1 / beta})
        tracking.end_run(ids[beta])
    table = runs_table("dpoflow").splitlines()
    assert table[0].split()[:3] == ["run", "id", "name"]
    assert "beta-0.5" in table[2] and "0.93" in table[2] and "beta-0.1" in table[3]  # best win rate first
    assert "sorted by eval/win_rate; 2 runs" in table[-1]
    diff = compare_runs(ids[0.1][:10], ids[0.5][:10])
    assert "dpo.beta" in diff and "eval/win_rate" in diff and "dpo.loss_type" not in diff  # only what differs


def _set_alias_at(args):
    start, alias, version = args
    from dpoflow import mlflow_registry

    while time.time() < start:
        pass
    try:
        mlflow_registry.set_alias("m", alias, version)
        return None
    except Exception as error:
        return str(error)[:200]


@pytest.mark.slow
def test_parallel_tasks_setting_one_alias_at_once_all_succeed(monkeypatch, tmp_path):
    """Two β register tasks set `candidate` at the same instant: MLflow's store reads "no such alias",
    then both insert and the loser gets a UNIQUE-constraint error (CI saw it; here 2 processes start
    each call together on a sqlite store: without the retry, about half the rounds lose one). `set_alias` retries the
    lost insert as the update it now is: every call succeeds, the alias names one of the versions."""
    import multiprocessing

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store = MlflowClient(tracking_uri=uri, registry_uri=uri)
    store.create_registered_model("m")
    for _ in range(2):
        store.create_model_version("m", (tmp_path / "model").as_uri())
    for round_ in range(16):  # fresh processes each round, as tasks are
        start = time.time() + 1.0
        with multiprocessing.get_context("fork").Pool(2) as pool:
            errors = pool.map(_set_alias_at, [(start, f"a{round_}", "1"), (start, f"a{round_}", "2")])
        assert errors == [None, None], errors
        assert str(store.get_model_version_by_alias("m", f"a{round_}").version) in ("1", "2")
