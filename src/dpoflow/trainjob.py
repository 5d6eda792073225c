"""DPO over several nodes as a Kubeflow Trainer TrainJob, created through the Kubeflow SDK.

`kubeflow.trainer.TrainerClient.train` with a `CustomTrainer` whose function runs `dpoflow dpo`:
here with the SDK's container backend, one container of the dpoflow image per node on a per-job
network, the run's folder mounted as /workspace in every node. Every node runs torchrun, and every
process `dpoflow dpo` on the paths under /workspace: inputs are read and the policy written in place
on the shared volume, no bytes are copied in or out. The runtime is `dpoflow-dpo`, the
ClusterTrainingRuntime that `dpoflow compile` writes to manifests/trainer/ for clusters (the dpoflow
image, the RWX volume `dpoflow-workspace` at /workspace). The DDP math is `dpoflow dpo
--num-processes`'s (global batch = per-device × accumulation × processes, seeded order), so N nodes
× P processes give the same weights as N·P processes on one machine, and as one process with the
same global batch.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

RUNTIME = "dpoflow-dpo"
RUNTIME_FILE = "manifests/trainer/dpoflow-dpo-runtime.yaml"
WORKSPACE = "/workspace"
PVC = "dpoflow-workspace"


def runtime_manifest(image: str) -> dict:
    """The ClusterTrainingRuntime the TrainJobs run on (what `dpoflow compile` writes to manifests/)."""
    node = {"name": "node", "image": image, "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE},
                                                              {"name": "shm", "mountPath": "/dev/shm"}]}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
        "metadata": {"name": RUNTIME, "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {"replicatedJobs": [{
            "name": "node",
            "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                         "spec": {"template": {"spec": {
                             "containers": [node],
                             "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": PVC}},
                                         {"name": "shm", "emptyDir": {"medium": "Memory"}}]}}}}}]}}},
    }


def node_main(argv: list[str]) -> None:
    """What every process of every node runs (the SDK sends this function's source to the nodes): the
    `dpoflow` command, in place of this process (its rank, world and exit code are the command's)."""
    import os
    import sys

    os.environ["DPOFLOW_LAUNCHED"] = "1"  # torchrun already made the processes: no relaunch
    os.execv(sys.executable, [sys.executable, "-m", "dpoflow.cli", *argv])


class TrainJobError(RuntimeError):
    pass


def in_workspace(path: Path, root: Path) -> str:
    """`path` (under the shared folder `root`) as the nodes see it."""
    try:
        return f"{WORKSPACE}/{Path(path).resolve().relative_to(root.resolve())}"
    except ValueError as error:
        raise TrainJobError(f"{path} is not under the shared folder {root}: with dpo.nodes > 1 every input and the "
                            "output must live on the volume the nodes mount (put them under it, or use dpo.nodes=1)") from error


def in_cluster() -> bool:
    """Inside a Kubernetes pod (a cluster pipeline's task): TrainJobs go to the cluster's Trainer
    through the SDK's Kubernetes backend. DPOFLOW_TRAINJOB_BACKEND=kubernetes|container overrides."""
    chosen = os.environ.get("DPOFLOW_TRAINJOB_BACKEND", "")
    return chosen == "kubernetes" or (not chosen and bool(os.environ.get("KUBERNETES_SERVICE_HOST")))


def node_image() -> str:
    """The nodes' image: the one `dpoflow run --image` named, else the task's own (a container task),
    else the dpoflow image of this version (`make image`)."""
    from dpoflow.image import DEFAULT_IMAGE

    return os.environ.get("DPOFLOW_NODE_IMAGE") or os.environ.get("DPOFLOW_IMAGE") or DEFAULT_IMAGE


def run_dpo_trainjob(config: dict, *, pairs: Path, reference_model: Path, reference_dir: Path | None,
                     init_model: Path | None, out_dir: Path, root: Path, nodes: int, processes_per_node: int,
                     image: str, gpus: bool = False, resume: bool = False, env: dict[str, str] | None = None,
                     log=print) -> dict:
    """`dpoflow dpo` over `nodes` nodes: every path (under the shared folder `root`) as the nodes see
    it, the output folder's parent open to the nodes' uid (they stage the output beside it, then
    rename it). `config` holds at least the `dpo` section; `reference_dir` is read only with its
    cached reference. Returns run_trainjob's record."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    local = not in_cluster()  # (on a cluster the nodes run as the task's own uid: nothing to open)
    if local:
        _allow(out_dir.parent, 0o777)
    if config["dpo"]["reference"] != "cached":
        reference_dir = None
    inputs = {flag: Path(path) for flag, path in (("--pairs", pairs), ("--reference-model", reference_model),
                                                   ("--reference-dir", reference_dir), ("--init-model", init_model))
              if path is not None}
    argv = ["--out", in_workspace(out_dir, root)]
    for flag, path in inputs.items():
        argv += [flag, in_workspace(path, root)]
    if local:
        readable_by_nodes(inputs.values(), root)
    if resume:
        argv.append("--resume")
    return run_trainjob(argv, config=config, root=root, nodes=nodes, processes_per_node=processes_per_node,
                        image=image, gpus=gpus, env=env, log=log)


def readable_by_nodes(paths, root: Path) -> None:
    """The nodes run as the image's uid 1000: the step output holding each of `paths` (all of it: the
    nodes verify it against its MANIFEST.json) readable by them, and every folder from `root` down to
    it searchable; each step output once (the reference model is often the initial policy too).
    (Outputs are staged with mkdtemp and safetensors' own files: 0700, 0600.)"""
    root = root.resolve()
    outputs = {next((folder for folder in [path, *path.parents] if (folder / "MANIFEST.json").exists()
                     and folder.is_relative_to(root)), path) for path in (Path(p).resolve() for p in paths)}
    for path in outputs:
        for folder in [path, *path.parents]:
            if folder.is_dir():
                _allow(folder, 0o055)
            if folder == root:
                break
        for inner in path.rglob("*") if path.is_dir() else [path]:
            if not inner.is_symlink():
                _allow(inner, 0o055 if inner.is_dir() else 0o044)


def _allow(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:  # (a folder someone else owns and already allows is left alone)
        path.chmod(mode | bits)


@contextlib.contextmanager
def _trainer(name: str, root: Path, image: str, log) -> Iterator:
    """The SDK's TrainerClient for one job: the cluster's (Kubernetes backend: the runtime is the
    ClusterTrainingRuntime an admin applied, the volume the one the pod mounts), or this machine's
    container engine (the runtime read from a file; ~/.kubeflow/trainer/containers/<job>, which
    the SDK mounts at /workspace, pointed at `root`)."""
    if in_cluster():
        from kubeflow.trainer import KubernetesBackendConfig, TrainerClient

        # in a pod: its service account and its namespace (else the kube config's current context)
        yield TrainerClient(KubernetesBackendConfig(namespace=os.environ.get("DPOFLOW_NAMESPACE") or None))
        return
    from kubeflow.trainer import ContainerBackendConfig, TrainerClient
    from kubeflow.trainer.backends.container.types import TrainingRuntimeSource

    from dpoflow.pipeline.containers import docker_api

    runtime_file = root / ".trainjobs" / f"{RUNTIME}.yaml"
    runtime_file.write_text(yaml.safe_dump(runtime_manifest(image), sort_keys=False))
    workdir = Path.home() / ".kubeflow" / "trainer" / "containers" / name
    workdir.parent.mkdir(parents=True, exist_ok=True)
    workdir.unlink(missing_ok=True)
    workdir.symlink_to(root.resolve(), target_is_directory=True)
    _allow(root, 0o777)  # the nodes run as the image's uid 1000
    try:
        with docker_api(log=log) as url:
            # auto_remove=False: the SDK would delete the job's folder with the job, and here that
            # folder is the run's shared volume
            yield TrainerClient(ContainerBackendConfig(
                container_runtime="podman" if "podman" in url else "docker", container_host=url,
                pull_policy="Never", auto_remove=False,
                runtime_source=TrainingRuntimeSource(sources=[f"file://{runtime_file}"])))
    finally:
        workdir.unlink(missing_ok=True)


def run_trainjob(dpo_argv: list[str], *, config: dict, root: Path, nodes: int, processes_per_node: int, image: str,
                 gpus: bool = False, env: dict[str, str] | None = None, timeout_s: float = 86400.0, log=print) -> dict:
    """Run `dpoflow dpo -c <config> <dpo_argv>` (paths already under /workspace; the resolved config is
    written beside the job for every node to read) as a TrainJob of `nodes` nodes, with `root` as
    /workspace: on the cluster this pod runs in, else on this machine's container engine. Streams
    node 0's log, raises TrainJobError naming the node that failed and its last lines, deletes the
    job (its containers and network here)."""
    from kubeflow.trainer import CustomTrainer
    from kubeflow.trainer.options import Name

    name = f"dpoflow-dpo-{uuid.uuid4().hex[:10]}"  # unique across tasks (containers share pids)
    jobs = root / ".trainjobs"
    jobs.mkdir(parents=True, exist_ok=True)
    config_file = jobs / f"config-{name}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    # `processes_per_node` GPUs per node; on CPU the SDK's container backend starts one process per
    # node unless given a GPU count, which there only sets torchrun's --nproc_per_node (gloo)
    resources = {"gpu": processes_per_node} if gpus or processes_per_node > 1 else {"cpu": 1}
    argv = ["dpo", "-c", in_workspace(config_file, root), *dpo_argv]
    trainer = CustomTrainer(func=node_main, func_args={"argv": argv}, num_nodes=nodes,
                            resources_per_node=resources, image=image,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})
    with _trainer(name, root, image, log) as client:
        started = time.monotonic()
        try:
            client.train(runtime=RUNTIME, trainer=trainer, options=[Name(name=name)])
            log(f"trainjob: {name}: {nodes} nodes x {processes_per_node} process(es) of {image}, "
                f"/workspace = {root}")
            _follow(client, name, timeout_s, log)
            config_file.unlink()
            return {"name": name, "nodes": nodes, "processes_per_node": processes_per_node,
                    "seconds": round(time.monotonic() - started, 1)}
        finally:
            _remove(client, name)


def _follow(client, name: str, timeout_s: float, log) -> None:
    """Stream node 0's log until the job completes; on failure name the node and its last lines."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while True:
        job = client.get_job(name)
        lines = _node_log(client, name, "node-0")
        for line in lines[seen:]:
            log(f"  node-0 | {line}")
        seen = len(lines)
        if job.status == "Complete":
            return
        failed = [step.name for step in job.steps if step.status == "Failed"]
        if failed:
            raise TrainJobError(f"TrainJob {name} failed: " + "; ".join(
                f"{step} exited with code {_exit_code(client, name, step)}; its last lines:\n    "
                + "\n    ".join(_own_lines(_node_log(client, name, step))[-12:]) for step in failed))
        if job.status == "Failed":  # before any node ran (a quota, a missing volume or runtime)
            raise TrainJobError(f"TrainJob {name} failed before its nodes ran: see `kubectl describe trainjob {name}` "
                                "and its events (a missing ClusterTrainingRuntime dpoflow-dpo, PVC dpoflow-workspace "
                                "or GPU quota are the usual causes)")
        if time.monotonic() > deadline:
            raise TrainJobError(f"TrainJob {name} did not finish in {timeout_s:.0f} s")
        time.sleep(2)


def _own_lines(lines: list[str]) -> list[str]:
    """A node's log up to torchrun's own report of the failure (what the process itself said)."""
    for index, line in enumerate(lines):
        if "elastic/multiprocessing/api.py" in line and "failed (exitcode" in line:
            return lines[:index]
    return lines


def _container(backend, name: str, step: str) -> dict:
    # the SDK's get_job_logs(step="node-0") returns every node's log: read one node's container
    return next(c for c in backend._get_job_containers(name) if c["labels"].get(f"{backend.label_prefix}/step") == step)


def _node_log(client, name: str, step: str) -> list[str]:
    backend = client.backend
    if not hasattr(backend, "_adapter"):  # the cluster: the node's pod log
        return list(client.get_job_logs(name, step=step))
    # read through the engine's client: the SDK's podman adapter returns podman-py 5.8's log generator
    # unread when not following
    logs = backend._adapter.get_container(_container(backend, name, step)["id"]).logs(stream=False)
    chunks = [logs] if isinstance(logs, bytes | str) else list(logs)
    return "".join(c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in chunks).splitlines()


def _exit_code(client, name: str, step: str):
    backend = client.backend
    if not hasattr(backend, "_adapter"):
        return "(see its pod)"
    return backend._adapter.container_status(_container(backend, name, step)["id"])[1]


def _remove(client, name: str) -> None:
    """The job (and here its containers and network: the SDK leaves the network when no container started)."""
    try:
        client.delete_job(name)
    except Exception:  # no container was created, or they are already gone
        pass
    if hasattr(client.backend, "_adapter"):
        client.backend._adapter.delete_network(f"{name}-net")
