"""MLflow's model registry: registered models, versions and their tags, aliases (never stages), the
alias lock that makes promotion compare-and-set, and models:/ URIs. Through tracking.py's client (its
URI, retries on a locked store or a lost insert race); the rules that move aliases are registry.py's.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from dpoflow.redact import redact
from dpoflow.tracking import client, end_run, experiment_id, load_mlflow, retrying, tracking_uri


def ensure_registered_model(name: str) -> None:
    """Create the registered model unless it exists (parallel β tasks may both try: the loser is fine)."""
    c = client()
    if c.search_registered_models(filter_string=f"name = '{name}'"):
        return
    try:
        retrying(c.create_registered_model, name)
    except Exception as error:
        if "already exists" not in str(error):
            raise


def register_version(model_dir: str, name: str, *, run_id: str, tags: dict, beside: Path | None = None) -> str:
    """Log a save_pretrained folder into `run_id` under `model/` (with the files of `beside` next to it:
    the MLmodel file that makes it a pyfunc model too, serving.py) and register it as a version of
    `name` (created if needed); return the version number."""
    for folder in (model_dir, beside) if beside is not None else (model_dir,):
        add_model_files(run_id, Path(folder))
    ensure_registered_model(name)
    c = client()
    # a plain artifact folder (not an MLflow flavor): register its artifact location directly, since
    # MLflow 3's register_model(runs:/...) looks for a LoggedModel
    artifact_uri = c.get_run(run_id).info.artifact_uri
    version = retrying(c.create_model_version, name, source=f"{artifact_uri}/model", run_id=run_id,
                       tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def add_model_files(run_id: str, folder: Path) -> None:
    """Log the files of `folder` beside the run's `model/` weights."""
    retrying(client().log_artifacts, run_id, str(folder), "model")


def register_model_dir(model_dir: str, name: str, alias: str | None = None, tags: dict | None = None,
                       experiment: str = "dpoflow") -> str:
    """Register a local model folder on its own (a run to hold it is created); optionally alias it."""
    mlflow = load_mlflow()
    run = mlflow.MlflowClient().create_run(experiment_id(mlflow, experiment), run_name=f"register-{name}")
    version = register_version(model_dir, name, run_id=run.info.run_id, tags=tags or {})
    end_run(run.info.run_id)
    if alias:
        set_alias(name, alias, version)
    return version


def _version(v) -> dict:
    # no aliases here: search_model_versions leaves them empty in the sqlite store; ask version_by_alias
    return {"version": str(v.version), "run_id": v.run_id, "tags": dict(v.tags)}


def model_versions(name: str) -> list[dict]:
    """Every version of `name`: {version, run_id, tags}, oldest first."""
    c = client()
    found = c.search_model_versions(filter_string=f"name = '{name}'")
    return sorted(map(_version, found), key=lambda v: int(v["version"]))


def model_version(name: str, version: str) -> dict | None:
    """Version `version` of `name` ({version, run_id, tags}), None when there is no such version."""
    try:
        return _version(client().get_model_version(name, str(version)))
    except Exception as error:
        if "RESOURCE_DOES_NOT_EXIST" not in str(error) and "not found" not in str(error).lower():
            raise
        return None


def version_by_alias(name: str, alias: str) -> dict | None:
    c = client()
    try:
        v = c.get_model_version_by_alias(name, alias)
    except Exception:
        return None
    return _version(v)


def set_alias(name: str, alias: str, version: str) -> None:
    retrying(client().set_registered_model_alias, name, alias, str(version), upsert=True)


def delete_alias(name: str, alias: str) -> None:
    try:
        retrying(client().delete_registered_model_alias, name, alias)
    except Exception:
        pass


class LockTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def alias_lock(name: str, *, holder: str, timeout_s: float = 600.0, stale_s: float = 900.0):
    """Hold the lock on `name`'s aliases: only one promotion or rollback reads and moves `champion` at
    a time, on any MLflow backend. The lock is a registered model `<name>.alias-lock`: creating it is
    atomic (the store refuses a second model of that name), deleting it releases. A lock older than
    `stale_s` (its holder was killed) is broken; waiting longer than `timeout_s` raises LockTimeout
    naming the holder."""
    c, lock = client(), f"{name}.alias-lock"
    deadline, delay = time.monotonic() + timeout_s, 0.1
    while True:
        try:
            retrying(c.create_registered_model, lock, tags={"holder": holder},
                     description=f"held while {holder} moves the aliases of {name}; deleted when done")
            break
        except Exception as error:
            if "already exists" not in str(error).lower() and "RESOURCE_ALREADY_EXISTS" not in str(error):
                raise
        try:
            held = c.get_registered_model(lock)
        except Exception:  # released between our create and this read
            continue
        age = time.time() - held.creation_timestamp / 1000
        if age > stale_s:
            with contextlib.suppress(Exception):
                c.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise LockTimeout(f"{name}: the alias lock is held by {held.tags.get('holder', '?')} for {age:.0f} s; "
                              f"delete the registered model {lock!r} if that holder is gone")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
    try:
        yield
    finally:
        retrying(c.delete_registered_model, lock)


def set_version_description(name: str, version: str, text: str) -> None:
    retrying(client().update_model_version, name, version, description=text)


def set_version_tags(name: str, version: str, tags: dict) -> None:
    c = client()
    for key, value in tags.items():
        retrying(c.set_model_version_tag, name, str(version), key, redact(str(value)))


def pin_model_uri(uri: str) -> str:
    """`models:/name@alias` -> `models:/name/<version>` (what the alias points at now), so a run reads
    one version throughout even if the alias moves meanwhile; any other URI as it is."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    name, alias = uri.removeprefix("models:/").split("@", 1)
    found = version_by_alias(name, alias)
    if found is None:
        raise ValueError(f"{uri}: registered model {name!r} has no alias {alias!r} in the MLflow registry at "
                         f"{tracking_uri()} (promote a version first, or point model.policy_init at a version)")
    return f"models:/{name}/{found['version']}"


def download_model(uri: str) -> str:
    """Local folder of a `models:/name@alias` or `models:/name/version` URI."""
    mlflow = load_mlflow()
    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as error:
        raise ValueError(f"cannot resolve {uri} in the MLflow registry at {tracking_uri()}: {error}") from error
