"""MLflow: the only module that imports mlflow. Tracking URI from MLFLOW_TRACKING_URI, else the local
sqlite default. Models are logged as plain `save_pretrained` folders (artifacts) and registered by
run URI; the registry uses aliases, never stages."""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def register_model_dir(model_dir: str, name: str, alias: str | None = None, tags: dict | None = None) -> str:
    """Log a save_pretrained folder as a run artifact, register it, optionally set an alias; return the version."""
    mlflow = _mlflow()
    with mlflow.start_run(run_name=f"register-{name}") as run:
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
