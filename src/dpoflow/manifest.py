"""Verified step outputs: a step writes into `<out>.partial/`, and only when it finished is a
MANIFEST.json (every file's sha256, the step, its key) written and the folder renamed into place.
A reader checks the manifest of every step output it takes:

    with building("sft", out_dir, inputs={"data": data_dir}, config=...) as (work, resumable):
        run_sft(..., work, resume=resumable)

- a folder without a manifest was not finished by a step (killed mid-write, or made by hand);
- a file whose sha256 differs was changed after the step wrote it (edited in place, truncated);
both are refused with the folder, the file and what to do.
- the key = sha256 of (step, its config section, the manifests of its inputs): the same settings on
  the same inputs give the same key, whether `dpoflow run`, a KFP pod or `dvc repro` built it — the
  manifest is byte-identical between them (it lists no times, hosts or paths).
- an interrupted step leaves `<out>.partial/` with its checkpoints and key; started again with the
  same key it resumes from the last checkpoint (`resumable`), with another key it starts afresh.

Files that are a run's record rather than its result (timing.json, checkpoints/, unrecorded metrics)
are not listed: they differ between two runs of the same step by design.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "MANIFEST.json"
BUILDING = ".building.json"
UNLISTED = {MANIFEST, BUILDING, "timing.json", "unrecorded_metrics.jsonl"}
UNLISTED_DIRS = {"checkpoints"}


class ManifestError(RuntimeError):
    """A step output is incomplete or changed after its step wrote it."""


def _feed(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    _feed(digest, path)
    return digest.hexdigest()


def files_digest(paths, *, names: bool = False) -> str:
    """One sha256 (16 hex) over the files' bytes in sorted order, each preceded by its name when `names`."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        if names:
            digest.update(path.name.encode())
        _feed(digest, path)
    return digest.hexdigest()[:16]


def model_sha(model_dir: Path) -> str:
    """Content hash of a model's weights (its safetensors files in name order): registering the same
    weights twice reuses the version; a policy records the weights it started from."""
    return files_digest(Path(model_dir).glob("*.safetensors"))


def listed_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and path.name not in UNLISTED and not UNLISTED_DIRS & set(relative.parts[:-1]):
            files.append(path)
    return files


def step_key(step: str, config, inputs: dict[str, Path]) -> str:
    """What a step output was made from: the step, its settings and its inputs' manifests."""
    digests = {role: manifest_digest(path) for role, path in sorted(inputs.items())}
    payload = json.dumps([step, config, digests], sort_keys=True, default=_plain)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _plain(value):
    """Config sections (pydantic models) and paths as JSON."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


def find_manifest(path: Path) -> Path | None:
    """The manifest that covers `path`: in it, or in the step folder it lies in (sft/model -> sft)."""
    for folder in (path, *list(path.parents)[:2]):
        if (folder / MANIFEST).is_file():
            return folder / MANIFEST
    return None


def manifest_digest(path: Path) -> str:
    """Identity of an input: its manifest's sha256, or (an external folder or file, e.g. a user's base
    model) the sha256 of its listed files."""
    path = Path(path)
    manifest = find_manifest(path) if path.is_dir() else None
    if manifest is not None:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    if path.is_file():
        return file_digest(path)[:16]
    if path.is_dir():
        return hashlib.sha256(json.dumps({str(p.relative_to(path)): file_digest(p) for p in listed_files(path)}
                                         ).encode()).hexdigest()[:16]
    return "absent"


def write_manifest(folder: Path, step: str, key: str) -> dict:
    manifest = {"step": step, "key": key,
                "files": {str(p.relative_to(folder)): file_digest(p) for p in listed_files(folder)}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify(path, *, required: bool = True) -> dict | None:
    """Check the step output at `path` (or the step folder above it) against its manifest; return the
    manifest. `required=False`: a folder without any manifest (e.g. a user's own model) passes."""
    path = Path(path)
    manifest_path = find_manifest(path)
    if manifest_path is None:
        if not required:
            return None
        raise ManifestError(f"{path} has no {MANIFEST}: no dpoflow step finished writing it (it was interrupted, "
                            "or the folder was made by hand). Run the step that makes it again (`dpoflow run` "
                            "redoes unfinished steps; `dvc repro` likewise)")
    folder = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ManifestError(f"{file} is missing: step {manifest['step']!r} wrote it (see {manifest_path}). "
                                "Run that step again, or restore the file")
        if file_digest(file) != expected:
            raise ManifestError(f"{file} changed after step {manifest['step']!r} wrote it (sha256 differs from "
                                f"{manifest_path}): edited in place, truncated or corrupted. Run that step again "
                                "(delete the folder first, or `dpoflow run` rebuilds it), or restore the file")
    return manifest


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def exclusive(lock_file: Path, what: str):
    """Hold an exclusive lock on `lock_file` (released when the process ends, even killed); a second
    holder is refused at once with the first one's pid."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise ManifestError(f"{what} is already running (pid {pid}): wait for it to finish, or use another "
                            "output folder / run name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextmanager
def building(step: str, out_dir, *, config, inputs: dict, verify_inputs: dict | None = None, resume: bool = False):
    """Build a step output atomically (see the module doc). `inputs` = role -> path; every one that
    is a step output is verified first (a path in `verify_inputs` with False may lack a manifest: a
    user's own model or pairs). Yields (work folder, resumable). `resume` (an explicit --resume):
    continue from the checkpoints in <out>.partial, or in <out> itself, whatever key made them."""
    out_dir = Path(out_dir)
    inputs = {role: Path(path) for role, path in inputs.items() if path is not None}
    for role, path in inputs.items():
        if path.exists():  # a missing input is the step's own error to explain
            verify(path, required=(verify_inputs or {}).get(role, True))
    key = step_key(step, config, inputs)
    work = out_dir.with_name(out_dir.name + ".partial")
    if not is_main_process():  # the main process owns the folders (DDP ranks only write checkpoints)
        yield work, (work / "checkpoints").is_dir()
        return
    with exclusive(out_dir.with_name(f".{out_dir.name}.lock"), f"step {step} writing {out_dir}"):
        record = work / BUILDING
        if resume and not work.exists() and (out_dir / "checkpoints").is_dir():
            out_dir.rename(work)
        resumable = False
        if work.exists():  # an interrupted build: resumable with the same key, else started afresh
            same = resume or (record.exists() and json.loads(record.read_text()).get("key") == key)
            resumable = same and (work / "checkpoints").is_dir()
            if not same:
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"step": step, "key": key}) + "\n")
        yield work, resumable
        record.unlink(missing_ok=True)
        write_manifest(work, step, key)
        _move_into_place(work, out_dir)


def _move_into_place(work: Path, out_dir: Path) -> None:
    replaced = set(os.listdir(out_dir)) if out_dir.is_dir() and not out_dir.is_symlink() else set()
    foreign = replaced - set(os.listdir(work)) - UNLISTED - UNLISTED_DIRS
    if foreign and not (out_dir / MANIFEST).exists():  # never delete what no step wrote
        raise ManifestError(f"{out_dir} holds {sorted(foreign)[:3]}, which no dpoflow step wrote: the finished "
                            f"output stays in {work}. Choose a new or empty output folder (--out)")
    if out_dir.is_symlink() or out_dir.is_file():
        out_dir.unlink()
    elif out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work.rename(out_dir)
