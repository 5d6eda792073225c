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


# ---- dvc.yaml's dependencies: every module a stage's step imports --------------------------------

ROOT = Path(__file__).resolve().parents[1]
STEP_MODULES = {"data": "dpoflow.data.step", "sft": "dpoflow.sft", "prefs": "dpoflow.preferences",
                "reference": "dpoflow.dpo.reference", "dpo": "dpoflow.dpo.train",
                "eval": "dpoflow.evaluation.evaluate", "frontier": "dpoflow.evaluation.report"}


def _module_file(name: str) -> Path | None:
    path = ROOT / "src" / Path(*name.split("."))
    return next((p for p in (path / "__init__.py", path.with_suffix(".py")) if p.exists()), None)


def _imported(name: str) -> set[str]:
    """The dpoflow modules `name` imports anywhere (at the top or inside a function), with their packages."""
    import ast

    file = _module_file(name)
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
    return {m for m in modules if _module_file(m)}


LOADED_BY_PATH = {"dpoflow.evaluation.metrics"}  # packages that load the scripts in their folder by path


def step_sources(stage: str) -> set[Path]:
    """Every source file the stage's step runs: the closure of its module's dpoflow imports (the whole
    folder of a package that loads its scripts by path)."""
    seen, todo = set(), [STEP_MODULES[stage]]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imported(module)
    return {(_module_file(m).parent if m in LOADED_BY_PATH else _module_file(m)).relative_to(ROOT) for m in seen}


def test_every_stage_depends_on_each_module_its_step_imports():
    """dvc.yaml's code deps are checked against the imports (transitively, lazy ones included) of the
    step each stage runs: editing any of them makes that stage stale. (`dpoflow <step>` is a thin
    wrapper: cli.py is not a dependency, like the KFP shells.) Missing ones are named with the fix."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STEP_MODULES)
    missing = {}
    for stage, spec in stages.items():
        deps = [Path(d) for d in (spec.get("do", spec)["deps"]) if d.startswith("src/")]
        uncovered = sorted(str(f) for f in step_sources(stage) if not any(f.is_relative_to(d) for d in deps))
        if uncovered:
            missing[stage] = uncovered
    assert not missing, f"add to dvc.yaml's deps (then `dvc repro` and commit dvc.lock): {missing}"
    assert Path("src/dpoflow/generation.py") in step_sources("prefs")  # the closure reaches lazy imports


def test_the_lock_matches_the_code_and_an_edited_module_stales_the_stages_that_import_it(tmp_path):
    """In a fresh copy of the project (no outputs), `dvc status` finds no code dependency changed
    since the committed dvc.lock; append a line to generation.py and exactly the stages whose steps
    import it report it modified."""
    import shutil

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    def changed_code() -> dict[str, set[str]]:
        out = subprocess.run([DVC, "status", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        stale = {}
        for stage, changes in json.loads(out).items():
            for change in changes:
                for path, what in change.get("changed deps", {}).items():
                    if path.startswith("src/"):
                        stale.setdefault(stage.split("@")[0], set()).add(f"{path} {what}")
        return stale

    assert changed_code() == {}, "dvc.lock is older than the code: run `dvc repro` and commit dvc.lock"
    with open(tmp_path / "src/dpoflow/generation.py", "a") as handle:
        handle.write("# edited\n")
    importers = {stage for stage in STEP_MODULES if Path("src/dpoflow/generation.py") in step_sources(stage)}
    assert importers == {"sft", "prefs", "reference", "dpo", "eval"}
    stale = changed_code()
    assert set(stale) == importers, stale
    assert all(any(entry.startswith("src/dpoflow/generation.py modified") for entry in entries) for entries in stale.values())


def test_every_dpoflow_import_resolves():
    """Most of dpoflow's imports are lazy (inside functions), where a renamed or moved name only
    fails when that path runs: every `from dpoflow... import name` in src/ and tests/ must resolve."""
    import ast
    import importlib

    broken = []
    for file in [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("dpoflow"):
                module = importlib.import_module(node.module)
                broken += [f"{file.relative_to(ROOT)}: {node.module}.{alias.name}" for alias in node.names
                           if not hasattr(module, alias.name) and not _module_file(f"{node.module}.{alias.name}")]
    assert broken == []
