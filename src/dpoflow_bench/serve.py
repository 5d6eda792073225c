"""A registered model under `mlflow models serve` on loopback, and bounded load against it:

    python -m dpoflow_bench.serve --model models:/smollm2-sentiment@champion --requests 200 --concurrency 8

starts the server (the tracking URI from MLFLOW_TRACKING_URI), sends the chat requests `concurrency`
at a time and prints p50 / p95 latency, throughput and errors as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
QUESTIONS = ["Write one sentence about a movie you loved.", "What makes a film review helpful?",
             "Describe a rainy day in two sentences.", "Name three things to pack for a picnic."]


def post(port: int, request: dict, timeout: float = 300) -> list[dict]:
    """POST /invocations on loopback; the predictions."""
    reply = urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"}), timeout=timeout)
    return json.loads(reply.read())["predictions"]


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
        return True
    except OSError:
        return False


@contextmanager
def mlflow_serve(model_uri: str, tracking_uri: str, start_s: float = 300):
    """`mlflow models serve` of `model_uri` on a free loopback port, yielded once it answers /ping;
    stopped after with SIGTERM, and it must stop answering within 30 s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "-h", "127.0.0.1",
                               "-p", str(port), "--env-manager", "local"],
                              env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}:{os.environ['PATH']}"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + start_s
        while not _answers(port):
            if server.poll() is not None:
                raise RuntimeError(f"the model server exited: {server.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not come up in {start_s:.0f} s")
            time.sleep(1)
        yield port
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
    deadline = time.monotonic() + 30  # uvicorn, the CLI's child in the same group, shuts down gracefully
    while _answers(port):
        if time.monotonic() > deadline:
            raise RuntimeError("the model server still answers 30 s after SIGTERM")
        time.sleep(0.5)


def load(port: int, requests: list[dict], concurrency: int) -> dict:
    """Every request POSTed, `concurrency` at a time: latency percentiles, throughput, errors."""
    def one(request: dict):
        started = time.perf_counter()
        try:
            predictions = post(port, request)
            return time.perf_counter() - started, None if predictions and predictions[0]["completion"] else "empty"
        except (OSError, urllib.error.HTTPError, KeyError, ValueError) as error:
            return time.perf_counter() - started, repr(error)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, error in results if error is None)
    errors = [error for _, error in results if error is not None]

    def percentile(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    return {"requests": len(requests), "concurrency": concurrency, "answered": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "p50_s": percentile(0.5), "p95_s": percentile(0.95),
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 3)}


def chat_requests(n: int, max_new_tokens: int) -> list[dict]:
    return [{"dataframe_records": [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}],
             "params": {"max_new_tokens": max_new_tokens, "seed": i}} for i in range(n)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/name@alias or models:/name/version")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    from dpoflow.tracking import tracking_uri

    with mlflow_serve(args.model, tracking_uri()) as port:
        report = load(port, chat_requests(args.requests, args.max_new_tokens), args.concurrency)
    print(json.dumps({"model": args.model, "max_new_tokens": args.max_new_tokens, **report}, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
