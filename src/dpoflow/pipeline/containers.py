"""What `dpoflow run --runner container` needs around kfp's DockerRunner: a Docker API (docker's, or
podman's service started for the run), an MLflow server over HTTP, and containers that report their
real exit code and are all gone when the run ends — success, failure or interrupt.

kfp 2.17's `docker_task_handler.run_docker_container` starts every task container with
`auto_remove=True` and, when the container is already gone by the time it asks for the exit code,
returns 0 ("we assume success"). podman's compat API removes an exited container sooner than docker
and answers some calls on it with 500 instead of 404, so under podman a task that raised was
reported SUCCESS and a run died on `500 ... no such container`. `ContainerTasks.run_container`
replaces that function for the run: the container is kept until its exit code has been read, then
removed. (Can go when kfp stops hard-coding auto_remove and assuming success on NotFound.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from pathlib import Path

RUN_LABEL = "dpoflow.run"  # every container of a run carries it: how the run finds what to stop
TASK_LABEL = "dpoflow.task"
OUTPUT_FILE = re.compile(r'"outputFile":\s*"([^"]+)/executor_output\.json"')


class ContainerError(RuntimeError):
    """No container engine, no image, or a service that did not come up."""


# ---- the Docker API -------------------------------------------------------------------------------

def _ping(host: str | None) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host) if host else docker.from_env()
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 (any failure means: not usable)
        return False


@contextlib.contextmanager
def docker_api(log=print) -> Iterator[str]:
    """A reachable Docker API for the run, as DOCKER_HOST: the one DOCKER_HOST names, docker's default
    socket, or podman's service started here (and stopped after). Yields the URL."""
    given = os.environ.get("DOCKER_HOST")
    if given:
        if not _ping(given):
            raise ContainerError(f"DOCKER_HOST={given} does not answer: start that engine, or unset DOCKER_HOST "
                                 "to let dpoflow start podman's API service")
        yield given
        return
    if _ping(None):
        yield "default"
        return
    podman = shutil.which("podman")
    if podman is None:
        raise ContainerError("no container engine: install podman (Debian: apt-get install podman runc) or docker, "
                             "or use --runner process")
    folder = Path(tempfile.mkdtemp(prefix="dpoflow-podman-"))
    url = f"unix://{folder / 'podman.sock'}"
    service = subprocess.Popen([podman, "system", "service", "--time", "0", url], stdout=subprocess.DEVNULL,
                               stderr=open(folder / "service.log", "wb"), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _ping(url):
            if service.poll() is not None or time.monotonic() > deadline:
                raise ContainerError(f"podman's API service did not start: {(folder / 'service.log').read_text()[-800:]}")
            time.sleep(0.2)
        log(f"container engine: podman's Docker API service, started for this run ({url})")
        os.environ["DOCKER_HOST"] = url
        yield url
    finally:
        os.environ.pop("DOCKER_HOST", None)
        _stop_process(service)
        shutil.rmtree(folder, ignore_errors=True)


def _stop_process(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM a service's whole process group, then SIGKILL what is left after `grace_s`."""
    import signal

    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def image_identity(image: str) -> dict:
    """The image as the engine knows it: its id and the identity labels its build set."""
    import docker

    client = docker.from_env()
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ContainerError(f"image {image!r} is not here: build it with `make image IMAGE={image} TORCH=cpu` "
                             "(README, 'Run it in containers'), or pass --image") from None
    finally:
        client.close()
    labels = found.labels or {}
    return {"reference": image, "id": found.id, "version": labels.get("org.opencontainers.image.version", ""),
            "git_sha": labels.get("org.opencontainers.image.revision", "")}


def engine_access(url: str) -> tuple[dict, dict]:
    """(volumes, environment) that give a task container this engine's Docker API: for a DPO task
    that starts its TrainJob's node containers itself (dpo.nodes > 1). Whoever holds the socket
    controls the engine, so only those tasks get it. podman's service started for the run listens
    in a private folder: its socket is opened to the tasks' uid 1000 through the mount alone."""
    if url.startswith("unix://") or url == "default":
        socket_path = Path(url.removeprefix("unix://")) if url != "default" else Path("/var/run/docker.sock")
        if socket_path.parent.name.startswith("dpoflow-podman-"):
            socket_path.chmod(0o666)
        inside = f"/run/dpoflow/{'podman' if 'podman' in url else 'docker'}.sock"
        return {str(socket_path): {"bind": inside, "mode": "rw"}}, {"DOCKER_HOST": f"unix://{inside}"}
    return {}, {"DOCKER_HOST": url}


# ---- an MLflow server for the run ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, log_path: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """`mlflow server` on loopback over `backend_store_uri`, serving artifacts from `artifacts` (tasks
    upload through it: nothing shared with the containers but the network). Stopped after."""
    artifacts.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    server = subprocess.Popen(command, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise ContainerError(f"mlflow server did not come up on {url}: {log_path.read_text()[-1500:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_process(server)


# ---- the task containers ---------------------------------------------------------------------------

def _artifact_folders(command: list[str], side: str) -> list[Path]:
    """The input or output artifact folders of a task, from the executor input in its command."""
    for arg in command:
        if arg.startswith("{") and '"outputs"' in arg:
            artifacts = json.loads(arg).get(side, {}).get("artifacts", {})
            return [Path(a["uri"].removeprefix("file://")) for entry in artifacts.values()
                    for a in entry.get("artifacts", [])]
    return []


def _bytes(paths: list[Path]) -> int:
    """Bytes of the files under `paths` (what a cluster's task downloads or uploads for them)."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total


class ContainerTasks:
    """The containers of one run: started with labels, their exit codes read before removal, their
    failures kept (task, exit code, last lines), and all of them stoppable at once."""

    def __init__(self, run: str, environment: dict[str, str], tail_lines: int = 30, volumes: dict | None = None,
                 dpo_access: tuple[dict, dict] = ({}, {})):
        """`volumes`: mounted into every task (the shared workspace); `dpo_access`: extra (volumes,
        environment) for the DPO tasks only (engine_access)."""
        self.run, self.environment, self.tail_lines, self.dpo_access = run, environment, tail_lines, dpo_access
        self.volumes = volumes or {}
        self.failures: list[dict] = []
        self.moved: list[dict] = []  # per task: the artifact bytes it read and wrote
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[ContainerTasks]:
        """kfp's DockerRunner starts task containers through this object while the block runs."""
        from kfp.local import docker_task_handler

        original = docker_task_handler.run_docker_container
        docker_task_handler.run_docker_container = self.run_container
        try:
            yield self
        finally:
            docker_task_handler.run_docker_container = original

    def run_container(self, client, image: str, command: list[str], volumes: dict, **run_args) -> int:
        """Same contract as kfp's run_docker_container: run the task's command, print its log, return its
        exit code — the real one."""

        if self.stopping.is_set():
            raise RuntimeError(f"run {self.run} is stopping: no new task starts")
        match = OUTPUT_FILE.search(" ".join(command))
        task = Path(match.group(1)).name if match else "?"
        environment = {**(run_args.pop("environment", None) or {}), **self.environment}
        volumes = {**volumes, **self.volumes}
        if task.startswith("dpo"):
            volumes, environment = {**volumes, **self.dpo_access[0]}, {**environment, **self.dpo_access[1]}
        container = client.containers.run(image=image, command=command, detach=True, volumes=volumes,
                                          labels={RUN_LABEL: self.run, TASK_LABEL: task}, environment=environment,
                                          **run_args)
        tail: deque[str] = deque(maxlen=self.tail_lines)
        pending = ""

        def show(text: str) -> None:
            nonlocal pending
            print(text, end="")
            *lines, pending = (pending + text).split("\n")
            tail.extend(lines)

        try:
            code = follow_logs(container, show)
            if pending:
                tail.append(pending)
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: stop() gives the task its grace period, then removes it
            raise
        except BaseException:
            _remove(container)
            raise
        _remove(container)
        with self.lock:
            if code != 0:
                self.failures.append({"task": task, "exit_code": code, "tail": list(tail)})
            else:
                self.moved.append({"task": task, "read": _bytes(_artifact_folders(command, "inputs")),
                                   "written": _bytes(_artifact_folders(command, "outputs"))})
        return code

    def stop(self, grace_s: float = 120.0) -> int:
        """Stop every container of this run (SIGTERM, then SIGKILL after `grace_s`: a training task
        checkpoints first) and remove them; no new one starts. Returns how many were running."""
        self.stopping.set()
        return remove_containers(self.run, grace_s)


def follow_logs(container, show, settle_s: float = 5.0) -> int:
    """Pass a container's log to `show` as it comes, until the container exits; return its exit code.

    The exit is awaited beside the log stream, not after it: podman 4.3's Docker API sometimes never
    ends a followed log of a container that has already exited (seen here about once in 100 short
    containers: the run hung). When the stream has not ended `settle_s` after the exit, it is closed
    and the rest of the log read whole, from where the stream stopped."""
    import codecs

    stream = container.logs(stream=True, follow=True)
    received, decoder, lock = bytearray(), codecs.getincrementaldecoder("utf-8")("replace"), threading.Lock()

    def read() -> None:
        with contextlib.suppress(Exception):  # the stream closed below, or the container removed
            for chunk in stream:
                with lock:
                    received.extend(chunk)
                    show(decoder.decode(chunk))

    reader = threading.Thread(target=read, name="container-log", daemon=True)
    reader.start()
    code = int(container.wait()["StatusCode"])
    reader.join(settle_s)
    if reader.is_alive():
        stream.close()
        reader.join(settle_s)
        with lock:
            rest = container.logs(stream=False)[len(received):]
            received.extend(rest)
            show(decoder.decode(rest, final=True))
    else:
        show(decoder.decode(b"", final=True))
    return code


def _remove(container) -> None:
    import docker

    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        container.remove(force=True)


def remove_containers(run: str, grace_s: float = 10.0) -> int:
    """Stop and remove the containers labelled with run `run` (also those a SIGKILLed run left)."""
    import docker

    client = docker.from_env()
    try:
        found = client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run}"})
        for container in found:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.stop(timeout=int(grace_s))
            _remove(container)
        return len(found)
    finally:
        client.close()


def failure_message(failure: dict) -> str:
    """'task dpo exited with code 1: <its error lines>' — what a user needs to look in the right place."""
    lines = [line for line in failure["tail"] if line.strip()]
    errors = [line for line in lines if re.match(r"^\s*[\w.]*(Error|Exception)\b", line)]
    shown = (errors[-1:] + lines[-5:]) if errors else lines[-8:]
    detail = "\n    ".join(dict.fromkeys(line.rstrip() for line in shown))
    return f"task {failure['task']} exited with code {failure['exit_code']}:\n    {detail}"


def run_outputs(run_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """Output artifacts of one pipeline run in the pipeline root: name -> [(folder, metadata)], read
    from each task's executor_output.json (what KFP itself records)."""
    found: dict[str, list[tuple[Path, dict]]] = {}
    for executor_output in sorted(run_dir.rglob("executor_output.json")):
        for name, output in json.loads(executor_output.read_text()).get("artifacts", {}).items():
            for artifact in output.get("artifacts", []):
                found.setdefault(name, []).append((Path(artifact["uri"]), artifact.get("metadata", {})))
    return found
