"""`dpoflow run`: the KFP pipeline of dag.py executed by kfp's local runner: SubprocessRunner in this
environment (`--runner process`, the default), or DockerRunner with every task in the dpoflow image
(`--runner container`: the cluster path, see containers.py). Step outputs land in outputs/<run>/<step> — the same
folders `dvc repro` writes — and finished steps are reused on a rerun (see reuse.py). The runner's own
log goes to outputs/<run>/kfp.log; the terminal gets one progress line per step (progress.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from dpoflow.config import Config, check_pipeline, config_dict, config_hash
from dpoflow.pipeline.progress import ProgressLog, first_error, print_summary, registry_summary
from dpoflow.redact import redact_mapping


def _absolute_tracking_uri() -> str:
    from dpoflow.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


class Terminated(KeyboardInterrupt):
    """`dpoflow run` got SIGTERM: its tasks are asked to stop too (training ones checkpoint first)."""


def _terminate(signum, frame):
    raise Terminated()


def _signal_tasks() -> list:
    """SIGTERM every task process of this run; returns them. kfp starts each task as `sh -c "...
    python3 -m kfp.dsl.executor_main ..."`, and a task dies with its parent (PR_SET_PDEATHSIG,
    tasks.py): a shell that took SIGTERM would end at once and take the training process with it,
    unsaved. The shells are left to end when their task does."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            if child.name() not in ("sh", "dash", "bash"):
                child.terminate()
        except psutil.NoSuchProcess:
            pass
    return children


def _stop_tasks(grace_s: float = 120.0) -> None:
    """SIGTERM every task process of this run and wait for them: a training task saves a checkpoint
    at the end of its current step and exits; anything still alive after `grace_s` is killed."""
    import psutil

    _, alive = psutil.wait_procs(_signal_tasks(), timeout=grace_s)
    for child in alive:
        child.kill()


RUNNERS = ("process", "container")


def run_local(cfg: Config, log=print, runner: str = "process", image: str | None = None,
              storage: str = "shared") -> dict:
    """Run the pipeline on this machine; write and return outputs/<run>/summary.json. One run of a
    name at a time (a second is refused with the first one's pid); SIGTERM stops it cleanly.

    runner "process": kfp's SubprocessRunner in this environment, step outputs in the run folder
    (reused on rerun). runner "container": the cluster path — the pipeline compiled for `image`,
    loaded from its YAML, every task in its own container under kfp's DockerRunner, MLflow over HTTP.
    Its `storage`: shared = the run folder mounted into every task container (a cluster's RWX volume:
    step outputs written there, pointers between tasks); artifacts = nothing shared but the pipeline
    root, every output copied through it."""
    import signal

    from dpoflow.manifest import exclusive

    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r}: choose one of {', '.join(RUNNERS)}")
    if runner == "process" and storage != "shared":
        raise ValueError("--storage artifacts needs --runner container: the process runner's tasks always share the "
                         "run folder")
    check_pipeline(cfg)
    root = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
    with exclusive(root.parent / f".{cfg.run.name}.run.lock", f"run {cfg.run.name!r} in {root.parent}"):
        process_session = _ProcessSession(root, image) if runner == "process" else None
        previous = signal.signal(signal.SIGTERM, process_session.on_sigterm if process_session else _terminate)
        try:
            if process_session:
                with process_session.installed():
                    return _run_local(cfg, root, log, process_session)
            from dpoflow.pipeline.components import DEFAULT_IMAGE

            with _ContainerSession(cfg, root, image or DEFAULT_IMAGE, log, storage) as session:
                return _run_local(cfg, root, log, session)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _workspace_outputs(cfg: Config, root: Path) -> tuple[dict, dict, dict]:
    """(results, policies, data stats) of a run whose step outputs are in its folder."""
    from dpoflow.layout import round_rel, round_run_name

    results, policies = {}, {}
    for beta in cfg.run.betas:
        for r in range(1, cfg.run.rounds + 1):
            name = round_run_name(beta, r, cfg.run.rounds)
            results[name] = json.loads((root / round_rel("eval", beta, r) / "metrics.json").read_text())
            policies[name] = str(root / round_rel("dpo", beta, r) / "model")
    return results, policies, json.loads((root / "data" / "stats.json").read_text())


class _ProcessSession:
    """Tasks as subprocesses of this environment; outputs in the run folder (reused on rerun)."""

    runner, store = "process", None
    rerun_note = "; finished steps are reused when you start it again"

    def __init__(self, root: Path, image: str | None = None):
        self.root = root
        self.terminated = False
        # --image: the image of the TrainJob nodes a DPO task starts (dpo.nodes > 1)
        self.environment = {"DPOFLOW_NODE_IMAGE": image} if image else {}

    def on_sigterm(self, signum, frame) -> None:
        """SIGTERM to `dpoflow run`: passed on to its tasks (a training task finishes its step, saves
        a checkpoint and exits 143) while the run keeps reading their output; no task starts after
        it, and the run ends as terminated once they have. (Raising here at once would close the
        pipe the tasks write to: a task printing its next line would die before its checkpoint.)"""
        self.terminated = True
        _signal_tasks()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_ProcessSession]:
        """kfp's SubprocessRunner starts task processes through this session while the block runs:
        warm ones (warm.py), and none once the run is terminated."""
        from kfp.local import subprocess_task_handler

        from dpoflow.pipeline import warm

        original = subprocess_task_handler.run_local_subprocess
        with contextlib.ExitStack() as stack:
            environment, command = dict(self.environment), (lambda full_command: full_command)
            if warm.enabled():
                self.root.mkdir(parents=True, exist_ok=True)
                environment[warm.SOCKET_ENV] = stack.enter_context(warm.server(self.root / ".warm-tasks.log"))
                command = warm.task_command

            def run_task(full_command, env_vars=None) -> int:
                return 143 if self.terminated else original(command(full_command), {**(env_vars or {}), **environment})

            subprocess_task_handler.run_local_subprocess = run_task
            try:
                yield self
            finally:
                subprocess_task_handler.run_local_subprocess = original

    def start(self, cfg: Config, retries: int = 0):
        from kfp import local

        from dpoflow.pipeline.dag import build_pipeline

        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(self.root / ".kfp"))
        return build_pipeline(config=cfg, retries=retries), {"workspace": str(self.root)}

    def stop(self, terminated: bool) -> None:
        if terminated:  # Ctrl-C reached the task processes already: the terminal signals the whole group
            _stop_tasks()

    def failure(self) -> str:
        return ""

    def outputs(self, cfg: Config) -> tuple[dict, dict, dict]:
        return _workspace_outputs(cfg, self.root)

    def lineage(self) -> dict:
        return {"runner": self.runner, "image": None}


class _ContainerSession:
    """Tasks in containers of `image` through the Docker API (podman's service started when none
    answers); MLflow over HTTP (a server started for the run unless MLFLOW_TRACKING_URI is http(s)).
    Everything it started is stopped and removed when the block ends, however it ends."""

    runner, rerun_note = "container", ""

    def __init__(self, cfg: Config, root: Path, image: str, log, storage: str = "shared"):
        self.cfg, self.root, self.image, self.log, self.storage = cfg, root, image, log, storage
        self.pipeline_root = root / ".kfp-container"
        self.stack, self.tasks, self.identity, self.runs_before, self.store = None, None, {}, set(), None

    def __enter__(self):
        import contextlib

        from dpoflow.pipeline import containers

        self.stack = contextlib.ExitStack().__enter__()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            engine = self.stack.enter_context(containers.docker_api(self.log))
            self.identity = containers.image_identity(self.image)
            left = containers.remove_containers(self.cfg.run.name)  # a SIGKILLed run of this name leaves its own
            if left:
                self.log(f"removed {left} container(s) an earlier run of {self.cfg.run.name} left behind")
            if self.cfg.tracking.enabled:
                self._tracking(containers)
            shared = {}
            if self.storage == "shared":  # the run folder is every task's workspace, at the same path
                self.root.chmod(0o777)  # tasks run as uid 1000
                shared = {str(self.root): {"bind": str(self.root), "mode": "rw"}}
                self.log(f"storage: {self.root} is mounted into every task: step outputs stay there, only "
                         "pointers to them travel as artifacts")
            dpo_access = ({}, {})
            if self.cfg.dpo.nodes > 1:  # each DPO task starts its TrainJob's nodes on this engine
                volumes, environment = containers.engine_access(engine)
                dpo_access = volumes, {**environment, "DPOFLOW_SHARED": str(self.pipeline_root.resolve())}
                self.log(f"dpo.nodes={self.cfg.dpo.nodes}: the DPO tasks start TrainJobs on this engine, sharing "
                         f"{self.root if shared else self.pipeline_root} with their nodes")
            self.tasks = containers.ContainerTasks(self.cfg.run.name, {"DPOFLOW_IMAGE_ID": self.identity["id"]},
                                                   volumes=shared, dpo_access=dpo_access)
            self.stack.enter_context(self.tasks.installed())
            self.stack.callback(self.tasks.stop, 10.0)  # whatever is still running when the run ends
        except BaseException:
            self.stack.__exit__(None, None, None)
            raise
        return self

    def _tracking(self, containers) -> None:
        """An http(s) tracking URI is used as it is; anything else is served by an MLflow server for the
        run: the sqlite file MLFLOW_TRACKING_URI names (artifacts in mlartifacts/ beside it), or a
        store in the run folder (mlflow/)."""
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith(("http://", "https://")):
            return
        if uri:
            store = _absolute_tracking_uri()
            artifacts = Path(store.removeprefix("sqlite:///")).parent / "mlartifacts"
        else:
            folder = self.root / "mlflow"
            folder.mkdir(parents=True, exist_ok=True)
            store, artifacts = f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts"
        url = self.stack.enter_context(containers.mlflow_server(store, artifacts, self.root / "mlflow-server.log"))
        self.log(f"MLflow: server for this run at {url} (store {store}, artifacts {artifacts})")
        self.stack.callback(_restore_env, "MLFLOW_TRACKING_URI", uri)
        os.environ["MLFLOW_TRACKING_URI"], self.store = url, store

    def __exit__(self, *exc) -> None:
        self.stack.__exit__(*exc)

    def start(self, cfg: Config, retries: int = 0):
        """The pipeline compiled for the image and loaded back from its YAML: the file a user uploads."""
        from kfp import compiler, components, local

        from dpoflow.pipeline.dag import build_pipeline

        self.pipeline_root.mkdir(parents=True, exist_ok=True)
        self.pipeline_root.chmod(0o777)  # tasks run as uid 1000 and write their outputs here
        self.runs_before = set(self.pipeline_root.iterdir())
        package = self.root / "pipeline.yaml"
        compiler.Compiler().compile(build_pipeline(self.image, cfg, retries=retries, storage=self.storage), str(package))
        local.init(runner=local.DockerRunner(network_mode="host"), pipeline_root=str(self.pipeline_root))
        workspace = str(self.root) if self.storage == "shared" else ""
        return components.load_component_from_file(str(package)), {"workspace": workspace}

    def stop(self, terminated: bool) -> None:  # the containers are not in this process group: always
        stopped = self.tasks.stop()
        self.log(f"stopped {stopped} running container(s)")

    def failure(self) -> str:
        from dpoflow.pipeline.containers import failure_message

        return "\n  ".join(failure_message(f) for f in self.tasks.failures)

    def outputs(self, cfg: Config) -> tuple[dict, dict, dict]:
        from dpoflow.layout import round_rel, round_run_name
        from dpoflow.pipeline.containers import run_outputs

        if self.storage == "shared":
            return _workspace_outputs(cfg, self.root)
        # (the TrainJobs of dpo.nodes > 1 keep their configs in .trainjobs/ beside the runs)
        (run_dir,) = {p for p in self.pipeline_root.iterdir() if not p.name.startswith(".")} - self.runs_before
        found = run_outputs(run_dir)
        results, policies = {}, {}
        for folder, _ in found.get("results", []):  # also under <run>/eval/, where the process runner puts them
            metrics = json.loads((folder / "metrics.json").read_text())
            results[round_run_name(metrics["beta"], metrics.get("round", 1), cfg.run.rounds)] = metrics
            shutil.copytree(folder, self.root / round_rel("eval", metrics["beta"], metrics.get("round", 1)),
                            dirs_exist_ok=True)
        for folder, metadata in found.get("policy", []):
            policies[round_run_name(metadata["beta"], metadata["round"], cfg.run.rounds)] = str(folder / "model")
        ((dataset, _),) = found["dataset"]
        return results, policies, json.loads((dataset / "stats.json").read_text())

    def lineage(self) -> dict:
        """Also the storage and the artifact bytes the tasks read and wrote: what a cluster moves
        through its object store for this run (every task downloads its inputs and uploads its
        outputs; with shared storage the outputs are pointers)."""
        moved = self.tasks.moved
        return {"runner": self.runner, "image": self.identity, "storage": self.storage, "artifact_bytes": {
            "read": sum(t["read"] for t in moved), "written": sum(t["written"] for t in moved), "tasks": moved}}


def _restore_env(name: str, value: str) -> None:
    if value:
        os.environ[name] = value
    else:
        os.environ.pop(name, None)


def _run_local(cfg: Config, root: Path, log, session) -> dict:
    from dpoflow.evaluation.report import write_frontier
    from dpoflow.layout import beta_threads
    from dpoflow.pipeline.parameters import pipeline_arguments
    from dpoflow.pipeline.reuse import EVENTS

    root.mkdir(parents=True, exist_ok=True)
    resolved = redact_mapping({"config_hash": config_hash(cfg), **config_dict(cfg)})
    (root / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    arguments = pipeline_arguments(cfg)
    parent, tracking = "", None
    if cfg.tracking.enabled:
        from dpoflow import tracking

        os.environ["MLFLOW_TRACKING_URI"] = _absolute_tracking_uri()
        tracking.check_reachable()
        parent = tracking.start_parent_run(cfg.tracking.experiment, cfg.run.name)
        arguments.update(mlflow_uri=os.environ["MLFLOW_TRACKING_URI"], mlflow_run_id=parent)
    arguments["threads_per_task"] = beta_threads(len(cfg.run.betas))

    log_path = root / "kfp.log"
    log(f"run {cfg.run.name}: the KFP pipeline on the local runner ({session.runner}); runner log: {log_path}")
    pipeline, runner_arguments = session.start(cfg)
    arguments.update(runner_arguments)
    workspace = runner_arguments["workspace"]
    events = Path(workspace) / ".steps" / EVENTS if workspace else None
    progress, started = ProgressLog(log_path, sys.stdout, events), time.perf_counter()
    terminal, errors = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = progress  # the runner's log, its warnings and the tasks' output: to kfp.log
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "settings have no effect in the local runner", image notes
            try:
                pipeline(**arguments)
            except RuntimeError:
                if not getattr(session, "terminated", False):
                    raise
        if getattr(session, "terminated", False):  # the tasks have stopped (a failed task, to kfp)
            raise Terminated()
    except KeyboardInterrupt as stop:
        sys.stdout, sys.stderr = terminal, errors
        session.stop(isinstance(stop, Terminated))
        if tracking is not None and not os.environ.get("MLFLOW_RUN_ID"):
            tracking.end_run(parent, "KILLED")
        raise
    except RuntimeError as error:
        if tracking is not None and not os.environ.get("MLFLOW_RUN_ID"):
            tracking.end_run(parent, "FAILED")
        reason = session.failure() or first_error(log_path) or str(error)
        raise RuntimeError(f"run {cfg.run.name} failed: {reason}\n  (full runner log: {log_path}{session.rerun_note})"
                           ) from None
    finally:
        sys.stdout, sys.stderr = terminal, errors
        progress.close()
    wall = time.perf_counter() - started

    results, policies, data_stats = session.outputs(cfg)
    write_frontier(root / "frontier", results)
    timings = {name: progress.seconds.get(name, 0.0) for name in progress.ran + progress.reused}
    summary = {"run": cfg.run.name, "config_hash": config_hash(cfg), **session.lineage(), "results": results,
               "policies": policies, "timings_s": timings, "wall_s": round(wall, 1), "tasks": progress.tasks,
               "data": data_stats}
    if tracking is not None:
        summary["mlflow_run_id"] = parent
        summary["mlflow_tracking_uri"] = session.store or os.environ["MLFLOW_TRACKING_URI"]
        if cfg.registry.enabled:
            summary["registry"] = registry_summary(cfg.registry.model_name, parent)
    (root / "summary.json").write_text(json.dumps(redact_mapping(summary), indent=2) + "\n")
    if tracking is not None:
        tracking.log_artifacts(parent, [root / "summary.json", root / "frontier" / "frontier.html"])
        if not os.environ.get("MLFLOW_RUN_ID"):
            tracking.end_run(parent)
    print_summary(cfg, root, summary, log)
    return summary
