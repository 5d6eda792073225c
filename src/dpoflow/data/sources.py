"""Read raw records from a source: JSONL, Parquet, CSV, a `datasets.save_to_disk` folder, a hub id,
or any of those inside a DVC repository at a git revision.

Readers yield `RawRow(number, record, error, raw)`: `record` is the parsed dict, or None with `error`
set to a reason ("malformed_json", "undecodable_bytes", ...) and `raw` holding the line as read, so
validation can quarantine it verbatim. Row numbers are 1-based (the line number for JSONL).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class DataSourceError(ValueError):
    """A source that cannot be read at all (missing file, unknown format, bad DVC path)."""


@dataclass
class RawRow:
    number: int
    record: dict | None
    error: str | None = None
    detail: str = ""
    raw: dict = field(default_factory=dict)


@dataclass
class SourceInfo:
    """Where the data came from: written to dataset.json and used as the lineage digest."""

    source: str
    kind: str  # jsonl | parquet | csv | hf_disk | hub | demo
    md5: str
    rev: str | None = None
    dvc_repo: str | None = None
    dvc_path: str | None = None


def _clean(value):
    """NaN (pandas' missing value) becomes None, numpy scalars/arrays become plain Python."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def file_md5(path: Path) -> str:
    from dpoflow.manifest import file_digest

    return file_digest(path, "md5")


def tree_md5(path: Path) -> str:
    """md5 of a file, or of a folder's (relative path, file md5) list, like DVC's `.dir` hashes."""
    if path.is_file():
        return file_md5(path)
    entries = [
        {"relpath": str(p.relative_to(path)), "md5": file_md5(p)} for p in sorted(path.rglob("*")) if p.is_file()
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def read_json_array(path: Path) -> Iterator[RawRow]:
    """A .json file holding one JSON array of row objects; row numbers are 1-based array positions."""
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataSourceError(f"{path}: starts with '[' but is not a valid JSON array ({error}); "
                              "fix the file or save it as JSON lines (.jsonl), one object per line") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            yield RawRow(number, None, "wrong_type", f"an array item must be a JSON object, got {type(record).__name__}",
                         {"raw_text": json.dumps(record)[:10000]})
        else:
            yield RawRow(number, record)


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def read_jsonl(path: Path) -> Iterator[RawRow]:
    if _starts_with_bracket(path):
        yield from read_json_array(path)
        return
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                yield RawRow(
                    number, None, "undecodable_bytes", f"not UTF-8 at byte {error.start}",
                    {"raw_text": line.decode("utf-8", "backslashreplace").rstrip("\n"),
                     "raw_base64": base64.b64encode(line).decode()},
                )
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield RawRow(number, None, "malformed_json", f"{error.msg} at column {error.colno}",
                             {"raw_text": text.rstrip("\n")})
                continue
            if not isinstance(record, dict):
                yield RawRow(number, None, "wrong_type", f"a line must be a JSON object, got {type(record).__name__}",
                             {"raw_text": text.rstrip("\n")})
                continue
            yield RawRow(number, record)


def _rows_from_records(records) -> Iterator[RawRow]:
    for number, record in enumerate(records, start=1):
        record = {k: _clean(v) for k, v in record.items()}
        yield RawRow(number, record)


def read_table(path: Path) -> Iterator[RawRow]:
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:  # csv: keep every cell a string, so '' stays '' (and is reported as empty) instead of NaN
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataSourceError(f"{path}: cannot be read as {path.suffix[1:]} ({error}). It may be truncated or "
                              "corrupted (an interrupted copy or download): copy or export it again") from error
    yield from _rows_from_records(frame.to_dict(orient="records"))


def read_hf_disk(path: Path, split: str = "train") -> Iterator[RawRow]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceError(f"{path}: DatasetDict has splits {list(loaded)}, not {split!r}")
        loaded = loaded[split]
    yield from _rows_from_records(loaded)


def detect_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf_disk"
        raise DataSourceError(
            f"{path} is a folder but not a `datasets.save_to_disk` folder (no dataset_info.json); "
            "point `data.source` at a .jsonl, .parquet or .csv file or a save_to_disk folder"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".csv"):
        return suffix[1:]
    raise DataSourceError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json (lines or one array), .parquet, "
                          ".csv or a save_to_disk folder")


def read_path(path: Path) -> Iterator[RawRow]:
    kind = detect_kind(path)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "hf_disk":
        return read_hf_disk(path)
    return read_table(path)


def open_local(source: str) -> tuple[Iterator[RawRow], SourceInfo]:
    path = Path(source)
    if not path.exists():
        raise DataSourceError(f"data source {source} does not exist (set data.source or pass --source)")
    return read_path(path), SourceInfo(source=str(path), kind=detect_kind(path), md5=tree_md5(path))


def open_hub(hub_id: str, split: str = "train") -> tuple[Iterator[RawRow], SourceInfo]:
    import datasets

    try:
        loaded = datasets.load_dataset(hub_id, split=split)
    except Exception as error:  # offline machines land here
        raise DataSourceError(f"could not load hub dataset {hub_id!r} ({error}); hub ids need network access") from error
    fingerprint = getattr(loaded, "_fingerprint", "")
    return _rows_from_records(loaded), SourceInfo(source=f"hub:{hub_id}", kind="hub", md5=fingerprint)


def dvc_lookup(repo: str, path: str, rev: str | None):
    """(DVCFileSystem at `rev`, info of `path`, its md5 from DVC's own index); clear errors otherwise."""
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(repo, rev=rev)
        info = fs.info(path)
    except Exception as error:
        raise DataSourceError(f"DVC source {repo}@{rev or 'HEAD'}:{path} cannot be read: {error}") from error
    md5 = info.get("md5") or info.get("dvc_info", {}).get("md5")
    if not md5:
        raise DataSourceError(f"DVC source {repo}:{path} is not tracked by DVC (no md5); `dvc add` it first")
    return fs, info, md5


def open_dvc(repo: str, path: str, rev: str | None, workdir: Path) -> tuple[Iterator[RawRow], SourceInfo]:
    """Fetch `path` from a DVC repo at `rev` into `workdir` and read it; md5 from DVC's own index."""
    fs, info, md5 = dvc_lookup(repo, path, rev)
    scm = fs.repo.scm
    resolved_rev = (scm.resolve_rev(rev) if rev else scm.get_rev()) if scm else rev  # a commit sha
    local = workdir / Path(path).name
    fs.get(path, str(local), recursive=info["type"] == "directory")
    rows = read_path(local)
    return rows, SourceInfo(
        source=f"dvc://{repo}@{resolved_rev}:{path}", kind=detect_kind(local), md5=md5,
        rev=resolved_rev, dvc_repo=repo, dvc_path=path,
    )


def open_source(source: str, dvc=None, workdir: Path | None = None) -> tuple[Iterator[RawRow], SourceInfo]:
    if dvc is not None:
        workdir = workdir or Path(tempfile.mkdtemp(prefix="dpoflow-dvc-"))
        return open_dvc(dvc.repo, dvc.path, dvc.rev, workdir)
    if source.startswith("hub:"):
        return open_hub(source[4:])
    return open_local(source)
