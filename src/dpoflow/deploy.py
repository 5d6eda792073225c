"""`dpoflow deploy`: a KServe InferenceService that serves one registered version.

The version is resolved now (an alias such as `champion` is pinned to the version it points at), and
the InferenceService reads that version's weights straight from the artifact store with KServe's
Hugging Face serving runtime (vLLM on a GPU, its Hugging Face backend on a CPU). The folder is a plain
`save_pretrained` one (config, safetensors, tokenizer), so the runtime loads it as it is; the MLmodel
beside it is ignored there. When the champion moves, deploying again changes `storageUri` and KServe
rolls the predictor over to the new weights.
"""

from __future__ import annotations

import re

# artifact stores KServe's storage initializer reads (https is for public files only)
CLUSTER_SCHEMES = ("s3://", "gs://", "pvc://", "hdfs://", "webhdfs://", "https://")


class DeployError(ValueError):
    pass


def storage_uri(artifact_uri: str, artifact_root: str | None = None) -> str:
    """Where the cluster reads a version's files. An MLflow server that proxies artifacts hands out
    `mlflow-artifacts:/<path>`: `artifact_root` is the store behind it (the server's
    --artifacts-destination, e.g. s3://mlflow/artifacts), and <path> is relative to it."""
    if artifact_uri.startswith("mlflow-artifacts:"):
        if not artifact_root:
            raise DeployError(f"{artifact_uri} is served through the MLflow server's artifact proxy: give "
                              "--artifact-root, the store behind it (its --artifacts-destination, e.g. "
                              "s3://mlflow/artifacts)")
        path = re.sub(r"^mlflow-artifacts:(//[^/]*)?/", "", artifact_uri)
        return artifact_root.rstrip("/") + "/" + path
    if artifact_uri.startswith(CLUSTER_SCHEMES):
        return artifact_uri
    raise DeployError(f"{artifact_uri} is not in a store a cluster can read ({', '.join(CLUSTER_SCHEMES)}): log "
                      "to an MLflow server whose artifacts live in object storage, or give --storage-uri")


def service_name(model_name: str) -> str:
    """A DNS-1123 label KServe accepts (it appends '-predictor-...' to it: at most 45 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:45].rstrip("-")
    if not name or not name[0].isalpha():
        name = ("m-" + name)[:45].rstrip("-")
    return name


def inference_service(*, model_name: str, version: dict, alias: str | None, uri: str, name: str | None = None,
                      namespace: str | None = None, gpus: int = 1, service_account: str | None = "dpoflow-serving",
                      max_model_len: int | None = None) -> dict:
    """The InferenceService (serving.kserve.io/v1beta1) for `version` ({version, tags}) read from `uri`."""
    tags = version["tags"]
    args = [f"--model_name={model_name}"]
    args.append("--dtype=bfloat16" if gpus else "--backend=huggingface")  # vLLM needs a GPU
    if max_model_len:
        args.append(f"--max_model_len={max_model_len}")
    resources = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = str(gpus)
    metadata = {"name": name or service_name(model_name),
                "labels": {"app.kubernetes.io/part-of": "dpoflow", "app.kubernetes.io/component": "serving"},
                "annotations": {"dpoflow/registered-model": model_name, "dpoflow/version": str(version["version"]),
                                "dpoflow/alias": alias or "", "dpoflow/model-sha": tags.get("dpoflow.model_sha", ""),
                                "dpoflow/beta": tags.get("dpoflow.beta", ""),
                                "dpoflow/win-rate": tags.get("dpoflow.win_rate", ""),
                                "dpoflow/gate": tags.get("dpoflow.gate", "")}}
    if namespace:
        metadata["namespace"] = namespace
    predictor = {"model": {"modelFormat": {"name": "huggingface"}, "args": args, "storageUri": uri,
                           "resources": resources}}
    if service_account:
        predictor["serviceAccountName"] = service_account  # holds the object store's credentials
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def run_deploy(model_name: str, *, alias: str | None = "champion", version: str | None = None,
               artifact_root: str | None = None, uri: str | None = None, **options) -> dict:
    """Resolve `models:/<model_name>@<alias>` (or `/<version>`) in the registry and render its
    InferenceService."""
    from dpoflow import mlflow_registry, tracking

    if version:
        found = mlflow_registry.model_version(model_name, version)
        what = f"models:/{model_name}/{version}"
    else:
        found = mlflow_registry.version_by_alias(model_name, alias)
        what = f"models:/{model_name}@{alias}"
    if found is None:
        raise DeployError(f"{what} is not in the MLflow registry at {tracking.tracking_uri()} (promote a version "
                          "first, or give --version)")
    if uri is None:
        location = tracking.client().get_model_version_download_uri(model_name, found["version"])
        uri = storage_uri(location, artifact_root)
    return inference_service(model_name=model_name, version=found, alias=None if version else alias, uri=uri,
                             **options)
