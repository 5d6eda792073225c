"""A real git+DVC repo with a dataset at two revisions, read by `dpoflow data` at each rev."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import write_jsonl
from dpoflow import steps
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


def step_sources(stage: str) -> set[Path]:
    """The files the stage's step runs (dpoflow.steps: also what `dpoflow run`'s reuse key hashes), from the repo root."""
    return {Path("src") / path for path in steps.step_sources(stage)}


def test_every_stage_depends_on_each_module_its_step_imports():
    """dvc.yaml's code deps are exactly the imports (transitively, lazy ones included) of the
    step each stage runs: editing any of them makes that stage stale. (`dpoflow <step>` is a thin
    wrapper: cli.py is not a dependency, like the KFP shells.) Missing ones are named with the fix."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(steps.STEP_MODULES)
    wrong = {}
    for stage, spec in stages.items():
        deps = {Path(d) for d in (spec.get("do", spec)["deps"]) if d.startswith("src/")}
        missing = sorted(str(f) for f in step_sources(stage) if not any(f.is_relative_to(d) for d in deps))
        extra = sorted(str(d) for d in deps if not any(f.is_relative_to(d) for f in step_sources(stage)))
        if missing or extra:
            wrong[stage] = {"add": missing, "remove": extra}
    assert not wrong, f"fix dvc.yaml's deps (then `dvc repro` and commit dvc.lock): {wrong}"
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
    importers = {stage for stage in steps.STEP_MODULES if Path("src/dpoflow/generation.py") in step_sources(stage)}
    assert importers == {"prefs", "eval"}  # sampling: the judged pairs and the evaluation
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
                           if not hasattr(module, alias.name) and not steps.module_file(f"{node.module}.{alias.name}")]
    assert broken == []


def test_the_import_graph_has_no_circle_and_layers_point_down():
    """Every dpoflow import (lazy ones included) points down: no module reaches itself again; the
    steps import neither the pipeline nor the CLI; the CLI takes no task body."""
    modules = {".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "src" / "dpoflow").rglob("*.py")}
    graph = {m: {d for d in steps.imported(m) if not m.startswith(d + ".") and d != m} for m in modules}
    circles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [module, target])
            elif target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert circles == []
    for step in steps.STEP_MODULES:
        above = [p for p in map(str, steps.step_sources(step))
                 if p.startswith(("dpoflow/pipeline/", "dpoflow/cli.py", "dpoflow/commands.py"))]
        assert above == [], step
    assert "dpoflow.pipeline.tasks" not in graph["dpoflow.cli"]


def test_the_reuse_key_of_a_step_changes_with_the_code_it_runs_and_only_that(tmp_path, monkeypatch):
    """`dpoflow run` reuses a step output while its key is unchanged; the key hashes the files the step
    imports (the same files dvc.yaml lists): editing generation.py changes the keys of prefs and eval
    only, editing the CLI or the bench changes none."""
    import shutil

    from dpoflow.pipeline.reuse import step_key

    package = tmp_path / "src" / "dpoflow"
    shutil.copytree(ROOT / "src" / "dpoflow", package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(steps, "PACKAGE", package)

    def keys() -> dict[str, str]:
        steps.step_sources.cache_clear()
        steps.code_digest.cache_clear()
        return {step: step_key(step, {"same": "settings"}, "upstream-key") for step in steps.STEP_MODULES}

    before = keys()
    assert len(set(before.values())) == len(before)  # each step's own code
    for edited in ("cli.py", "commands.py", "pipeline/local.py"):
        with open(package / edited, "a") as handle:
            handle.write("# edited\n")
    assert keys() == before
    with open(package / "generation.py", "a") as handle:
        handle.write("# edited\n")
    after = keys()
    assert {step for step in before if after[step] != before[step]} == {"prefs", "eval"}
    steps.step_sources.cache_clear()
    steps.code_digest.cache_clear()
