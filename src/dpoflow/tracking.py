"""MLflow: the only module that imports mlflow. Tracking URI from MLFLOW_TRACKING_URI, else the local
sqlite default. Models are logged as plain `save_pretrained` folders (artifacts) and registered by
run URI; the registry uses aliases, never stages."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _experiment_id(mlflow, name: str) -> str:
    """The experiment to log to: the one KFP injected (MLFLOW_EXPERIMENT_ID) when this store has it,
    else `name`, created if needed; a local store keeps its artifacts in ./mlartifacts rather than
    MLflow's default ./mlruns. (mlflow.set_experiment is avoided: it exports MLFLOW_EXPERIMENT_ID,
    which would leak into the next store this process talks to.)"""
    injected = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if injected:
        try:
            return mlflow.MlflowClient().get_experiment(injected).experiment_id
        except Exception:  # not in this store: fall back to the named experiment
            pass
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = not tracking_uri().startswith(("http://", "https://"))
    return mlflow.create_experiment(name, artifact_location=Path("mlartifacts").resolve().as_uri() if local else None)


def register_model_dir(model_dir: str, name: str, alias: str | None = None, tags: dict | None = None,
                       experiment: str = "dpoflow") -> str:
    """Log a save_pretrained folder as a run artifact, register it, optionally set an alias; return the version."""
    mlflow = _mlflow()
    with mlflow.start_run(run_name=f"register-{name}", experiment_id=_experiment_id(mlflow, experiment)) as run:
        mlflow.log_artifacts(model_dir, artifact_path="model")
        if tags:
            mlflow.set_tags(tags)
    client = mlflow.MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    # a plain artifact folder (not an MLflow flavor): register its artifact location directly, since
    # MLflow 3's register_model(runs:/...) looks for a LoggedModel
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                          tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def download_model(uri: str) -> str:
    """Local folder of a `models:/name@alias` or `models:/name/version` URI."""
    mlflow = _mlflow()
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as error:
        raise ValueError(f"cannot resolve {uri} in the MLflow registry at {tracking_uri()}: {error}") from error


def _git_sha() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def log_pipeline_run(*, experiment: str, run_name: str, params: dict, tags: dict, dataset: dict,
                     runs: dict[str, dict], artifacts: list[Path]) -> str:
    """One parent run per pipeline run (or the run KFP injected through MLFLOW_RUN_ID), one nested run
    per β with the DPO metrics per step under TRL's names, the evaluation metrics (`eval/…`) and the
    report. `dataset` = {frame, name, source, digest}: logged as the training input with the DVC md5
    as digest. `runs[name]` = {params, metrics_jsonl, eval_metrics, artifacts}. Returns the parent id."""
    import json

    mlflow = _mlflow()
    parent_id = os.environ.get("MLFLOW_RUN_ID")
    experiment_id = None if parent_id else _experiment_id(mlflow, experiment)
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else run_name,
                          experiment_id=experiment_id) as parent:
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[start:start + 100]))
        mlflow.set_tags({**tags, "dpoflow.git_sha": _git_sha() or "unknown"})
        source = mlflow.data.from_pandas(dataset["frame"], source=dataset["source"], name=dataset["name"],
                                         digest=dataset["digest"])
        mlflow.log_input(source, context="training")
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for name, run in runs.items():
            with mlflow.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id):
                mlflow.log_params(run["params"])
                mlflow.set_tags(tags)
                for line in Path(run["metrics_jsonl"]).read_text().splitlines():
                    record = json.loads(line)
                    mlflow.log_metrics(_numeric({k: v for k, v in record.items() if k != "step"}), step=record["step"])
                mlflow.log_metrics({f"eval/{k}": v for k, v in _numeric(run["eval_metrics"]).items()})
                for path in run["artifacts"]:
                    mlflow.log_artifact(str(path))
        return parent.info.run_id
