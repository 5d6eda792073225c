"""Which module each step runs, and the code that step runs: the closure of its module's dpoflow
imports (at the top or inside functions). One answer for everything that decides whether a step's
output is current: `dpoflow run`'s reuse key hashes exactly these files (pipeline/reuse.py), and the
code deps of each dvc.yaml stage are these files (tests/test_dvc.py holds them equal). Editing a
module a step imports reruns that step and the steps below it under both; editing anything else
(the CLI, the bench, another step) reruns nothing.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
STEP_MODULES = {"data": "dpoflow.data.step", "sft": "dpoflow.sft", "prefs": "dpoflow.preferences",
                "reference": "dpoflow.dpo.reference", "dpo": "dpoflow.dpo.train",
                "eval": "dpoflow.evaluation.evaluate", "frontier": "dpoflow.evaluation.report"}
LOADED_BY_PATH = {"dpoflow.evaluation.metrics"}  # packages that load the scripts in their folder by path


def module_file(name: str) -> Path | None:
    """The source file of dpoflow module `name` (a package's __init__.py), None if there is none."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return next((p for p in (path / "__init__.py", path.with_suffix(".py")) if p.exists()), None)


def imported(name: str) -> set[str]:
    """The dpoflow modules `name` imports anywhere (at the top or inside a function), with their packages."""
    file = module_file(name)
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base] * bool(base))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    modules = set()
    for module in found:
        parts = module.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0] == "dpoflow"}
    return {m for m in modules if module_file(m)}


@cache
def step_sources(step: str) -> tuple[Path, ...]:
    """Every source file `step` runs, relative to the package's parent folder (src/), sorted: the
    closure of its module's imports (the whole folder of a package that loads its scripts by path)."""
    seen, todo = set(), [STEP_MODULES[step]]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imported(module)
    files = set()
    for module in seen:
        path = module_file(module)
        files |= {p for p in path.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts} \
            if module in LOADED_BY_PATH else {path}
    return tuple(sorted(p.relative_to(PACKAGE.parent) for p in files))


@cache
def code_digest(step: str) -> str:
    """sha256 (16 hex) of the names and bytes of the files `step` runs."""
    digest = hashlib.sha256()
    for relative in step_sources(step):
        digest.update(str(relative).encode() + b"\0" + (PACKAGE.parent / relative).read_bytes())
    return digest.hexdigest()[:16]
