"""Is a step's output current, and where is it: the reuse key, the run folder's step records and the
pointers between tasks.

- **workspace** (a folder every task mounts: the run folder under `dpoflow run`, mounted into each
  container by `--runner container`; on a cluster the ReadWriteMany volume `dpoflow-workspace`): the
  step writes into `<workspace>/<step>` — the same folders `dvc repro` writes — and its KFP output
  artifact is only a pointer (LOCATION: the folder and its manifest's digest), so no model bytes
  travel through the artifact store. A step whose inputs are unchanged is reused:
  `<workspace>/.steps/<step>.json` records the key it was built with (the code the step runs, its config
  section, its upstream steps' keys, the content of external inputs). A killed run, started again,
  redoes only what did not finish. A reader follows the pointer and is refused when the folder has
  since been rebuilt into something else. The key alone decides: KFP's cache is off for these tasks.
- **no workspace** (`--storage artifacts`): the step writes into the artifact folder that KFP
  uploads; reuse is KFP's caching, keyed on the inputs (the data md5 is one of them, so new data
  re-runs the steps).

Every output artifact carries `dpoflow_key` in its metadata; a downstream key includes it, so a
change anywhere upstream invalidates everything below it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from dpoflow.config import DataConfig
from dpoflow.manifest import ManifestError, find_manifest, manifest_digest, verify
from dpoflow.steps import code_digest


def step_key(step: str, *parts) -> str:
    """The reuse key of a step's output: the code the step runs (steps.code_digest: the files its module
    imports, the same files dvc.yaml lists as the stage's deps) and `parts` (its settings, its
    upstream outputs' keys, the content of its external inputs)."""
    return hashlib.sha256(json.dumps([code_digest(step), *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_fingerprint(location: str | None) -> str | None:
    """What a step's external input holds now, so edited files are never mistaken for unchanged ones.

    A local file or folder: its md5. Anything that can move without a local trace (a hub id, a
    models:/ alias): a fresh token, so steps that read it always rerun. None: nothing external.
    """
    from dpoflow.data.sources import tree_md5

    if location is None or location == "demo":
        return None
    if Path(location).exists():
        return tree_md5(Path(location))
    return f"unpinned-{os.urandom(8).hex()}"


def data_fingerprint(cfg: DataConfig) -> str | None:
    if cfg.dvc is not None:  # DVC's own md5 at the requested rev (a branch can move)
        from dpoflow.data.sources import dvc_lookup

        return dvc_lookup(cfg.dvc.repo, cfg.dvc.path, cfg.dvc.rev)[2]
    return content_fingerprint(cfg.source)


EVENTS = "events.jsonl"


def step_event(records: Path, step: str, event: str, **fields) -> None:
    """Append one event of a step (running, progress with its text, finished with its seconds, reused) to <records>/EVENTS:
    what `dpoflow run` shows and times, read as data (parallel tasks append whole lines)."""
    records.mkdir(parents=True, exist_ok=True)
    with open(records / EVENTS, "a") as handle:
        handle.write(json.dumps({"step": step, "event": event, **fields}) + "\n")


def run_step(name: str, out_dir: Path, key: str, fn: Callable[[], object], records: Path, log=print) -> float:
    """Run `fn` unless out_dir holds a finished output built with the same key. Returns its seconds
    (0 when reused). The record lives in `records` (<run>/.steps/), not in the step's folder, so that
    folder is byte-identical whether `dpoflow run` or `dvc repro` produced it."""
    marker = records / f"{name.replace(' ', '-')}.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key and out_dir.exists():
        try:
            verify(out_dir)
            log(f"[{name}] inputs unchanged, reusing {out_dir}")
            step_event(records, name, "reused")
            return 0.0
        except ManifestError as error:
            log(f"[{name}] not reusable: {error}; running it again")
    marker.unlink(missing_ok=True)
    started = time.perf_counter()
    log(f"[{name}] running -> {out_dir}")
    step_event(records, name, "running")
    from dpoflow.meter import reporting

    with reporting(lambda text: step_event(records, name, "progress", text=text)):
        fn()
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"key": key}) + "\n")
    step_event(records, name, "finished", seconds=round(seconds, 2))
    return seconds


LOCATION = "dpoflow-location.json"


def point_to(artifact, target: Path) -> None:
    """Make `artifact` a pointer to the step output `target` in the workspace: a folder holding only
    LOCATION (the absolute path and the digest of the manifest it had), its metadata the same."""
    target = Path(target).resolve()
    digest = manifest_digest(target) if find_manifest(target) is not None else ""
    path = Path(artifact.path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / LOCATION).write_text(json.dumps({"path": str(target), "manifest": digest}) + "\n")
    artifact.metadata.update({"location": str(target), "manifest": digest})


def copy_into(artifact_path: str, target: Path) -> None:
    path = Path(artifact_path)
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(target, path, symlinks=False)


def folder_of(artifact) -> Path:
    """Where an input artifact's files are: the workspace folder its pointer names (checked against
    the manifest digest it recorded), or the artifact's own folder."""
    pointer = Path(artifact.path) / LOCATION
    if not pointer.is_file():
        return Path(artifact.path)
    location = json.loads(pointer.read_text())
    target = Path(location["path"])
    if not target.exists():
        raise ManifestError(f"{target} is gone: the step output this run's artifact {artifact.path} points at was "
                            "deleted from the workspace. Run the pipeline again with caching off for that step "
                            "(or delete its KFP cache entry) so that it is rebuilt")
    if location["manifest"] and manifest_digest(target) != location["manifest"]:
        raise ManifestError(f"{target} no longer holds the output that was recorded in {pointer} (its MANIFEST.json "
                            "changed: another run rebuilt that step into the same workspace folder). Give "
                            "overlapping runs their own workspace (the pipeline parameter), or run again")
    return target


def path_of(artifact, *parts: str) -> Path:
    """An input artifact's folder as the step should see it: the workspace folder it points at,
    relative to the project when inside it — the same path string `dvc repro` passes, so outputs that
    record an input path stay byte-identical between `dpoflow run` and `dvc repro`."""
    path = folder_of(artifact).joinpath(*parts).resolve()
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def produce(name: str, rel: str, artifact, key: str, workspace: str, fn: Callable[[Path], object], log=print) -> Path:
    """Run step `name` (fn(out_dir)) into <workspace>/<rel>, reused when `key` is unchanged, and link
    the artifact to it (a pointer); with no workspace, into the artifact folder itself. Returns the folder."""
    if workspace:
        out_dir = Path(workspace) / rel
        if out_dir.is_relative_to(Path.cwd()):
            out_dir = out_dir.relative_to(Path.cwd())
        run_step(name, out_dir, key, lambda: fn(out_dir), Path(workspace) / ".steps", log)
        point_to(artifact, out_dir)
    else:
        out_dir = Path(artifact.path)
        fn(out_dir)
    artifact.metadata["dpoflow_key"] = key
    return out_dir

