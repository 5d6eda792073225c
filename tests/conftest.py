import json
import os
from pathlib import Path

import pytest

# Tests never reach a hub; HF libraries must stay offline and write caches under tmp.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "wb") as handle:
        handle.writelines(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode() for row in rows)
    return path


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
