"""Which image a task runs in: lineage that survives on a cluster, where no git checkout exists.

`components/Dockerfile` writes the image's own identity (version, git sha, torch build) into
/opt/dpoflow/image.json; the pipeline gives every task its image reference (`DPOFLOW_IMAGE`, set at
compile time) and `dpoflow run --runner container` adds the engine's image id (`DPOFLOW_IMAGE_ID`).
A task outside any image (the process runner, `dvc repro`) has none of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpoflow import __version__

BUILD_INFO = Path("/opt/dpoflow/image.json")
# what `make image` builds; a cluster's is given with `dpoflow compile --image` / `make image IMAGE=...`
DEFAULT_IMAGE = f"dpoflow/dpoflow:{__version__}"


def build_info(path: Path = BUILD_INFO) -> dict:
    """The image's identity as its build recorded it ({} outside the image)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def image_lineage() -> dict:
    """Tags for a registered version / summary: image reference, id and git sha; 'none' outside an image."""
    info = build_info()
    if not info:
        return {"image": "none"}
    return {"image": os.environ.get("DPOFLOW_IMAGE", "unknown"), "image_id": os.environ.get("DPOFLOW_IMAGE_ID", ""),
            "image_git_sha": info.get("git_sha", "unknown"), "image_torch": info.get("torch", "")}
