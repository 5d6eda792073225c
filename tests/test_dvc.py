"""A real git+DVC repo with a dataset at two revisions, read by `dpoflow data` at each rev."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import write_jsonl
from dpoflow.config import DataConfig, DvcSource
from dpoflow.data.step import run_data

DVC = str(Path(sys.executable).parent / "dvc")


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _commit_version(repo, rows, message):
    write_jsonl(repo / "pairs.jsonl", rows)
    subprocess.run([DVC, "add", "-q", "pairs.jsonl"], cwd=repo, check=True)
    subprocess.run([DVC, "push", "-q"], cwd=repo, check=True)
    _git(repo, "add", "pairs.jsonl.dvc", ".gitignore")
    _git(repo, "commit", "-qm", message)
    return _git(repo, "rev-parse", "HEAD")


def test_dataset_at_two_revisions(tmp_path):
    repo = tmp_path / "datarepo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "remote", "add", "-q", "-d", "store", str(tmp_path / "remote")], cwd=repo, check=True)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "dvc init")

    v1 = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    v2 = v1 + [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10, 25)]
    rev1 = _commit_version(repo, v1, "data v1")
    _git(repo, "tag", "v1")
    rev2 = _commit_version(repo, v2, "data v2")
    # drop the workspace copy and the cache: the reads below must come from the remote at each rev
    (repo / "pairs.jsonl").unlink()
    subprocess.run(["rm", "-rf", str(repo / ".dvc" / "cache")], check=True)

    results = {}
    for rev, ask in ((rev1, "v1"), (rev2, rev2)):  # a tag resolves to its commit
        cfg = DataConfig(kind="preferences", source="pairs.jsonl", eval_fraction=0.2,
                         dvc=DvcSource(repo=str(repo), path="pairs.jsonl", rev=ask))
        results[rev] = run_data(cfg, tmp_path / f"out-{rev[:7]}")
    first, second = results[rev1], results[rev2]
    assert first.stats["kept"] == 10 and second.stats["kept"] == 25
    assert first.dataset["rev"] == rev1 and second.dataset["rev"] == rev2
    md5_1 = (repo / "pairs.jsonl.dvc").read_text()  # the current .dvc file holds v2's md5
    assert second.dataset["md5"] in md5_1 and first.dataset["md5"] != second.dataset["md5"]
    assert first.stats["input_md5"] == first.dataset["md5"]
    written = json.loads((tmp_path / f"out-{rev1[:7]}" / "dataset.json").read_text())
    assert written["dvc_repo"] == str(repo) and written["dvc_path"] == "pairs.jsonl" and written["rev"] == rev1
    total = sum(len(pd.read_parquet(tmp_path / f"out-{rev2[:7]}" / f"{s}.parquet")) for s in ("train", "eval"))
    assert total == 25
