"""The registered champion answers generation requests under `mlflow models serve` (a real server on
loopback, stopped after), and the same files still load with plain transformers."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champion(tmp_path, tiny_model_dir, monkeypatch):
    from dpoflow import tracking
    from dpoflow.registry import run_promote, run_register
    from dpoflow.serving import Policy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    run_id = tracking.start_parent_run("dpoflow", "serve")
    version = run_register(tiny_model_dir, {"win_rate": 0.8, "beta": 0.1}, {"beta": 0.1}, model_name="m",
                           run_id=run_id, log=lambda *_: None)
    run_promote("m", version, force=True, log=lambda *_: None)
    local = tracking.download_model("models:/m@champion")
    from mlflow.models import Model

    signature = Model.load(str(Path(local) / "MLmodel")).signature
    assert signature.inputs.input_names() == ["prompt"] and signature.params.params[0].name == "max_new_tokens"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(local).config.vocab_size > 0  # still plain transformers
    expected = Policy(local).predict({"prompt": ["the film was", "a movie"]}, {"max_new_tokens": 6, "seed": 3})

    port = _free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/m@champion", "-h", "127.0.0.1",
                               "-p", str(port), "--env-manager", "local"], env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                                                                            "PATH": f"{BIN}:{os.environ['PATH']}"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                assert time.time() < deadline, "the model server did not come up in 180 s"
                time.sleep(1)
        request = {"dataframe_records": [{"prompt": "the film was"}, {"prompt": "a movie"}],
                   "params": {"max_new_tokens": 6, "seed": 3}}
        reply = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"}), timeout=60)
        predictions = json.loads(reply.read())["predictions"]
        print("served:", json.dumps(request), "->", json.dumps(predictions))
        assert [p["completion"] for p in predictions] == expected["completion"].tolist()  # the same seeded samples
        assert all(isinstance(p["completion"], str) for p in predictions)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(
            {"dataframe_records": [{"prompt": "x"}], "params": {"max_new_tokens": "many"}}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
    deadline = time.time() + 30  # uvicorn, the CLI's child in the same group, shuts down gracefully
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            time.sleep(0.5)
        except OSError:
            break
    else:
        pytest.fail("the model server still answers 30 s after SIGTERM")
