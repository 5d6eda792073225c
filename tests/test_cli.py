"""The command line and the DVC stage call the same step; `--help` lists only working commands."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dpoflow(*args, cwd=ROOT, check=True):
    result = subprocess.run([str(BIN / "dpoflow"), *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_data_command_shortcuts(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(8)] + [{"prompt": "q9", "chosen": "x"}]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    failed = dpoflow("data", "--set", "data.kind=preferences", "--source", str(source), "--out", str(tmp_path / "s"),
                     check=False)
    assert failed.returncode == 1 and "row 9: missing_field - field 'rejected' is missing" in failed.stderr
    assert "--mode quarantine" in failed.stderr
    ok = dpoflow("data", "--set", "data.kind=preferences", "--source", str(source), "--mode", "quarantine",
                 "--out", str(tmp_path / "q"))
    assert "9 rows in, 8 kept, quarantined {'missing_field': 1}" in ok.stdout
    stats = json.loads((tmp_path / "q" / "stats.json").read_text())
    assert stats["rows_in"] == 9 and stats["kept"] == 8 and stats["quarantined"] == {"missing_field": 1}


def test_bad_override_exits_2_naming_the_key():
    result = dpoflow("config", "show", "--set", "data.nope=1", check=False)
    assert result.returncode == 2 and "data.nope: unknown key" in result.stderr


def test_config_show_prints_hash():
    out = dpoflow("config", "show").stdout
    assert json.loads(out.rsplit("config_hash:", 1)[0])["data"]["source"] == "demo"
    assert len(out.rsplit("config_hash: ", 1)[1].strip()) == 16


@pytest.mark.slow
def test_dvc_repro_in_a_fresh_copy(tmp_path):
    """`dvc repro` in a fresh copy of the project runs every stage through `dpoflow <step>`; tiny params."""
    import yaml

    from dpoflow.config import apply_overrides
    from test_pipeline import TINY

    work = tmp_path / "project"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, work / name)
    params = apply_overrides(yaml.safe_load((work / "params.yaml").read_text()),
                             [s for s in TINY if not s.startswith("run.name")])
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([str(BIN / "dvc"), "repro"], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = json.loads((work / "outputs/demo/data/stats.json").read_text())
    assert stats["rows_in"] == stats["kept"] == 400
    metrics = subprocess.run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=work, env=env,
                             capture_output=True, text=True, check=True).stdout
    shown = json.dumps(json.loads(metrics))
    assert "outputs/demo/eval/beta-0.1/metrics.json" in shown and "outputs/demo/eval/beta-0.5/metrics.json" in shown
    assert '"win_rate"' in shown and '"kl"' in shown
    assert (work / "dvc.lock").exists()

    # `dpoflow run` is the same pipeline: it rewrites every stage's outputs byte for byte
    rerun = subprocess.run([str(BIN / "dpoflow"), "run"], cwd=work, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "dpo beta-0.5: running" in rerun.stdout
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=work, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout


def test_readme_commands_parse():
    """Every `.venv/bin/dpoflow ...` line of the README is a command the CLI accepts (no drift)."""
    import shlex

    from dpoflow.cli import build_parser

    # indented ones too (the cluster steps: compile --image, submit, schedule: the most flags)
    lines = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.strip().startswith(".venv/bin/dpoflow")]
    commands = {shlex.split(line)[1] for line in lines}
    assert {"compile", "submit", "schedule", "deploy", "dpo", "run", "runs", "promote", "register"} <= commands
    assert sum(line.startswith(".venv/bin/dpoflow compile --image") for line in lines) == 1
    parser = build_parser()
    for line in lines:
        command = line.removeprefix(".venv/bin/dpoflow ")
        for alternative in command.split(" | "):  # "data | sft | ..." lists several commands
            parser.parse_args(shlex.split(alternative))
    assert "make run" in (ROOT / "README.md").read_text() and "make test" in (ROOT / "README.md").read_text()
