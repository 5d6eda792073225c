"""Warm task processes for `dpoflow run --runner process`: every KFP task starts already imported.

kfp's SubprocessRunner starts each task as a new Python (`python3 -m kfp.dsl.executor_main ...`), and
a task of a tiny pipeline spends most of its life importing torch, transformers, mlflow and pandas
(3-9 s a task, a dozen tasks a run). A run therefore starts one server that imports them once, and
each task's command runs this module's client instead of kfp's executor: the client hands its
arguments, environment, working folder and standard streams to the server, which forks a child that
runs kfp's executor exactly as the cold process would (same streams, so kfp reads the same log; the
same exit code). Where no server answers, the client becomes the cold process itself.

Signals keep their meaning: a task is a descendant of `dpoflow run` in its process group, so SIGTERM
(passed on to the tasks) and Ctrl-C reach it directly; the client and the server ignore them (the
server ends once its tasks have). A task dies with the server, and the server with `dpoflow run`
(PR_SET_PDEATHSIG): a SIGKILLed run leaves no task behind. Set DPOFLOW_WARM_TASKS=0 for cold tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

SOCKET_ENV = "DPOFLOW_WARM_SOCKET"
EXECUTOR = "kfp.dsl.executor_main"
# what the tasks import (each step's module and what it imports at its top)
PRELOAD = (EXECUTOR, "dpoflow.pipeline.tasks", "dpoflow.pipeline.registry_tasks", "dpoflow.data.step", "dpoflow.sft",
           "dpoflow.preferences", "dpoflow.dpo.reference", "dpoflow.dpo.train", "dpoflow.evaluation.evaluate",
           "dpoflow.tracking", "dpoflow.mlflow_registry", "mlflow", "mlflow.store.tracking.sqlalchemy_store")
_HEADER = struct.Struct("!Q")


def enabled() -> bool:
    return os.environ.get("DPOFLOW_WARM_TASKS", "1") != "0"


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def server(log_path: Path) -> Iterator[str]:
    """A warm server for this block; yields its socket path (an environment value for the tasks)."""
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dpoflow-warm-"))
    path = folder / "tasks.sock"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", __name__, "serve", str(path)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield str(path)
    finally:
        process.terminate()  # it ends once its tasks have
        try:
            process.wait(timeout=150)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        path.unlink(missing_ok=True)
        folder.rmdir()


def task_command(full_command: list[str]) -> list[str]:
    """kfp's command for a task with its executor started through this module's client."""
    return [part.replace(f"-m {EXECUTOR} ", f"-m {__name__} ") for part in full_command]


# ---- the server ------------------------------------------------------------------------------------

def serve(path: str) -> None:
    """Bind, import what the tasks import, then fork a task per connection; report each exit code on
    its connection. SIGTERM: accept no more, end once every task has ended."""
    import importlib
    import traceback

    _die_with_parent()
    stopping: list[int] = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)  # clients that come while the imports run wait in the backlog
    os.environ["_KFP_RUNTIME"] = "true"  # as in the task's command: kfp skips its client side
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # the task that needs it fails with the error itself
            traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    running: dict[int, socket.socket] = {}
    while not (stopping and not running):
        ready, _, _ = select.select([] if stopping else [listener], [], [], 0.1)
        if ready:
            connection, _ = listener.accept()
            try:
                request, fds = _receive(connection)
            except (OSError, ValueError) as error:  # a client that went away: no task
                print(f"warm tasks: a request was lost ({error})", file=sys.stderr)
                connection.close()
                continue
            pid = os.fork()
            if pid == 0:  # the task: never returns
                listener.close()
                for other in (connection, *running.values()):
                    other.close()
                _run_task(request, fds)
            for fd in fds:
                os.close(fd)
            running[pid] = connection
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = running.pop(pid)
            with contextlib.suppress(OSError):
                connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            connection.close()


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(connection, _HEADER.size, 3)
    while len(data) < _HEADER.size:
        data += connection.recv(_HEADER.size - len(data))
    (size,) = _HEADER.unpack(data)
    body = bytearray()
    while len(body) < size:
        chunk = connection.recv(min(size - len(body), 1 << 20))
        if not chunk:
            raise ConnectionError("the task's client went away")
        body += chunk
    return json.loads(body), fds


def _run_task(request: dict, fds: list[int]) -> None:
    """In the forked child: become the cold task process (streams, folder, environment, arguments,
    signals, a fresh random state) and run kfp's executor; exit as that process would."""
    import random
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent()
    random.seed()  # unseeded generators as in a new process (the tasks seed their own work)
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = [EXECUTOR, *request["argv"]]
    code = 0
    try:
        from kfp.dsl.executor_main import executor_main

        executor_main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    raise SystemExit(code)  # the interpreter's own exit: atexit handlers run, streams are flushed


# ---- the client (the task's command) ------------------------------------------------------------------

def client(argv: list[str]) -> int:
    """Run this task in the warm server and return its exit code (128 + N for signal N, as a shell
    reports it); without a server, exec the cold executor."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(os.environ[SOCKET_ENV])
    except (KeyError, OSError):
        os.execv(sys.executable, [sys.executable, "-m", EXECUTOR, *argv])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the task itself gets them (same process group, same run)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(connection, [_HEADER.pack(len(body))], [0, 1, 2])
    connection.sendall(body)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = connection.recv(64)
        if not chunk:
            print("dpoflow: the warm task server ended before this task did", file=sys.stderr)
            return 137
        reply += chunk
    code = int(reply)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1:]))
