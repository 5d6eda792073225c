"""Multi-node DPO: the job specs the launcher component creates, and the launch itself.

KFP tasks are single pods; DPO across nodes runs as a job of the cluster's training engine:

- Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1, the maintained path): `runtimeRef`
  to the `torch-distributed` ClusterTrainingRuntime, `numNodes`, `resourcesPerNode`.
- Training Operator v1 `PyTorchJob` (kubeflow.org/v1) for older clusters: Master + Worker replicas.

Both run `torchrun -m dpoflow.cli dpo ...` on every node: the engines export PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR/PORT, which torchrun reads as its defaults. Pairs,
reference cache, base model and output live on one ReadWriteMany PVC mounted at /workspace in every
pod (and in the pipeline's tasks). Credentials come from a Secret as environment variables.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass

MOUNT = "/workspace"


@dataclass
class JobSpec:
    beta: float
    dpo_config: str          # DpoConfig as JSON
    image: str
    nodes: int
    gpus_per_node: int
    pvc_name: str
    pairs_path: str          # paths relative to the PVC root
    reference_model_path: str
    reference_path: str
    output_path: str
    namespace: str = "kubeflow"
    secret_name: str = ""
    name: str = ""

    def job_name(self) -> str:
        return self.name or f"dpoflow-dpo-beta-{str(self.beta).replace('.', '-')}-{int(time.time()) % 100000}"


def _command(spec: JobSpec) -> list[str]:
    config = json.dumps({"dpo": {**json.loads(spec.dpo_config), "beta": spec.beta}})
    dpo = (f"torchrun -m dpoflow.cli dpo -c /tmp/dpoflow-config.json --pairs {MOUNT}/{spec.pairs_path} "
           f"--reference-model {MOUNT}/{spec.reference_model_path} --reference-dir {MOUNT}/{spec.reference_path} "
           f"--out {MOUNT}/{spec.output_path} --resume")
    # the config travels in the spec itself (no ConfigMap to clean up); --resume: a restarted node
    # group continues from the last checkpoint on the shared volume
    return ["sh", "-c", f"printf '%s' {shlex.quote(config)} > /tmp/dpoflow-config.json && exec {dpo}"]


def _env(spec: JobSpec) -> list[dict]:
    env = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "NCCL_DEBUG", "value": "WARN"}]
    if spec.secret_name:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": key,
                                                                     "optional": True}}})
    return env


def _volumes(spec: JobSpec) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "workspace", "persistentVolumeClaim": {"claimName": spec.pvc_name}},
               {"name": "shm", "emptyDir": {"medium": "Memory"}}]  # NCCL needs a big /dev/shm
    mounts = [{"name": "workspace", "mountPath": MOUNT}, {"name": "shm", "mountPath": "/dev/shm"}]
    return volumes, mounts


def trainjob(spec: JobSpec) -> dict:
    """Kubeflow Trainer v2 TrainJob on the torch-distributed runtime."""
    volumes, mounts = _volumes(spec)
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": spec.job_name(), "namespace": spec.namespace, "labels": {"app": "dpoflow"}},
        "spec": {
            "runtimeRef": {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                           "kind": "ClusterTrainingRuntime"},
            "trainer": {"image": spec.image, "command": _command(spec), "numNodes": spec.nodes,
                        "numProcPerNode": spec.gpus_per_node,
                        "resourcesPerNode": {"limits": {"nvidia.com/gpu": spec.gpus_per_node}},
                        "env": _env(spec)},
            "podSpecOverrides": [{"targetJobs": [{"name": "node"}], "volumes": volumes,
                                  "containers": [{"name": "node", "volumeMounts": mounts}]}],
        },
    }


def pytorchjob(spec: JobSpec) -> dict:
    """Training Operator v1 PyTorchJob: one Master and nodes-1 Workers."""
    volumes, mounts = _volumes(spec)

    def replica(count: int) -> dict:
        return {"replicas": count, "restartPolicy": "OnFailure", "template": {"spec": {
            "containers": [{"name": "pytorch", "image": spec.image, "command": _command(spec), "env": _env(spec),
                            "resources": {"limits": {"nvidia.com/gpu": spec.gpus_per_node}},
                            "volumeMounts": mounts}],
            "volumes": volumes}}}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": spec.job_name(), "namespace": spec.namespace, "labels": {"app": "dpoflow"}},
            "spec": {"nprocPerNode": str(spec.gpus_per_node), "pytorchReplicaSpecs": replicas}}


ENGINES = {  # engine -> (builder, group, version, plural, pod label of the job's pods)
    "trainjob": (trainjob, "trainer.kubeflow.org", "v1alpha1", "trainjobs", "jobset.sigs.k8s.io/jobset-name"),
    "pytorchjob": (pytorchjob, "kubeflow.org", "v1", "pytorchjobs", "training.kubeflow.org/job-name"),
}


def _state(job: dict) -> tuple[str, str]:
    """('running' | 'succeeded' | 'failed', message) from a TrainJob's or PyTorchJob's conditions."""
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("status") != "True":
            continue
        if condition["type"] in ("Complete", "Succeeded"):
            return "succeeded", condition.get("message", "")
        if condition["type"] == "Failed":
            return "failed", condition.get("message", "")
    return "running", ""


def launch(spec: JobSpec, engine: str = "trainjob", timeout_s: int = 86400, poll_s: float = 15.0, api=None) -> str:
    """Create the job, wait for it, stream the rank-0 pod's log; raise when it fails or times out.
    Returns the output path on the shared volume."""
    from kubernetes import client, config

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use one of {sorted(ENGINES)}")
    builder, group, version, plural, label = ENGINES[engine]
    if api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    body = builder(spec)
    name = body["metadata"]["name"]
    api.create_namespaced_custom_object(group, version, spec.namespace, plural, body)
    print(f"multinode: created {body['kind']} {spec.namespace}/{name} ({spec.nodes} nodes x {spec.gpus_per_node} GPUs)")
    deadline = time.monotonic() + timeout_s
    while True:
        state, message = _state(api.get_namespaced_custom_object(group, version, spec.namespace, plural, name))
        if state != "running":
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{body['kind']} {name} still running after {timeout_s}s")
        time.sleep(poll_s)
    _print_logs(spec.namespace, f"{label}={name}")
    if state == "failed":
        raise RuntimeError(f"{body['kind']} {name} failed: {message}")
    return spec.output_path


def _print_logs(namespace: str, selector: str) -> None:
    from kubernetes import client

    try:
        core = client.CoreV1Api()
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items[:1]:
            print(core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=200))
    except Exception as error:  # logs are a courtesy; the job's status decides
        print(f"multinode: could not read logs ({error})")
