"""Warm task processes (dpoflow.pipeline.warm): a task forked from the run's warm server behaves as the
cold process kfp would start — its return value, environment, working folder, log and exit code — and
only its start-up differs (what it has imported already)."""

import json
import os
import signal

import pytest
from kfp import dsl, local
from kfp.local import subprocess_task_handler

from dpoflow.pipeline.local import _ProcessSession


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def probe(tag: str) -> str:
    import json
    import os
    import random
    import sys

    print(f"probe {tag} says hello")
    return json.dumps({"tag": tag, "imported": "torch" in sys.modules, "cwd": os.getcwd(), "pid": os.getpid(),
                       "image": os.environ.get("DPOFLOW_NODE_IMAGE"), "random": random.random()})


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def ends(how: str):
    import os
    import signal
    import sys

    print(f"ending by {how}")
    if how == "exit 3":
        sys.exit(3)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError("a task's own error")


def _tasks(tmp_path, monkeypatch, capsys, warm: bool) -> tuple[list[dict], list[int], str]:
    """The probes and the failing tasks under one session: (probe outputs, exit codes, their log)."""
    monkeypatch.setenv("DPOFLOW_WARM_TASKS", "1" if warm else "0")
    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=False)
    session, codes = _ProcessSession(tmp_path / ("warm" if warm else "cold"), image="dpoflow/node:1"), []
    with session.installed():
        run = subprocess_task_handler.run_local_subprocess
        monkeypatch.setattr(subprocess_task_handler, "run_local_subprocess",
                            lambda *args, **kwargs: codes.append(run(*args, **kwargs)) or codes[-1])
        probes = [json.loads(probe(tag=tag).output) for tag in ("a", "b")]
        for how in ("exit 3", "raise", "SIGKILL"):
            ends(how=how)
    return probes, codes, capsys.readouterr().out


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_a_task_runs_as_the_cold_process_would(tmp_path, monkeypatch, capsys, warm):
    probes, codes, log = _tasks(tmp_path, monkeypatch, capsys, warm)
    assert codes == [0, 0, 3, 1, 128 + signal.SIGKILL]
    assert [p["imported"] for p in probes] == [warm, warm]  # what the warm server had imported already
    for tag, result in zip("ab", probes):
        assert result["tag"] == tag and result["cwd"] == str(tmp_path) and result["image"] == "dpoflow/node:1"
        assert result["pid"] != os.getpid()
    assert probes[0]["pid"] != probes[1]["pid"] and probes[0]["random"] != probes[1]["random"]  # fresh processes
    assert "probe a says hello" in log and "ending by exit 3" in log and "ValueError: a task's own error" in log
    import psutil

    left = [c.cmdline() for c in psutil.Process().children(recursive=True)]
    assert not [line for line in left if "dpoflow.pipeline.warm" in " ".join(line)]  # the server ended with the run
