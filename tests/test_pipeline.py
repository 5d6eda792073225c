"""`dpoflow run` end to end on a tiny config: every step really runs, then a rerun reuses them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run.name=tiny", "run.betas=[0.1,0.5]", "data.demo.n_reviews=400", "data.eval_fraction=0.3",
        "model.preset=tiny", "model.vocab_size=400", "sft.max_steps=30", "sft.per_device_batch_size=16",
        "prefs.max_new_tokens=16", "prefs.max_prompts=64", "prefs.max_eval_prompts=24", "dpo.max_steps=8",
        "dpo.per_device_batch_size=8", "dpo.checkpoint_every=0", "eval.max_prompts=24", "eval.max_new_tokens=16"]


@pytest.mark.slow
def test_run_end_to_end_and_reuse(tmp_path):
    args = [str(Path(sys.executable).parent / "dpoflow"), "run", "-c", str(ROOT / "params.yaml"),
            f"--set=run.output_dir={tmp_path}"] + [f"--set={s}" for s in TINY]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert set(summary["results"]) == {"beta-0.1", "beta-0.5"}
    resolved = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert resolved["config_hash"] == summary["config_hash"] and resolved["dpo"]["max_steps"] == 8
    for metrics in summary["results"].values():
        assert metrics["n_prompts"] == 24 and 0.0 <= metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
        assert {"kl", "reward_margin", "implicit_accuracy", "length_policy"} <= set(metrics)
    assert {"data", "sft", "prefs", "reference", "dpo beta-0.1", "eval beta-0.5"} <= set(summary["timings_s"])
    assert "win rate" in first.stdout and "summary.json" in first.stdout

    _check_mlflow(tmp_path / "mlflow.db", summary)
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()

    second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert second.returncode == 0
    assert second.stdout.count("inputs unchanged, reusing") == 8  # data sft prefs reference + 2x(dpo, eval)
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["results"] == summary["results"]


@pytest.mark.slow
def test_run_on_user_pairs_with_a_given_reference(tmp_path, tiny_model_dir, monkeypatch):
    """The path of a real user: own preference pairs + an existing reference model from the MLflow
    registry (models:/name@alias; no SFT, no prefs)."""
    from conftest import make_pairs

    from dpoflow.tracking import register_model_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    register_model_dir(str(tiny_model_dir), "my-sft", alias="production")

    frame = make_pairs(60).drop(columns=["prompt_messages"])
    (tmp_path / "pairs.jsonl").write_text(frame.to_json(orient="records", lines=True))
    settings = ["run.name=user", "run.betas=[0.1]", "data.kind=preferences", f"data.source={tmp_path / 'pairs.jsonl'}",
                "data.eval_fraction=0.3", "model.base=models:/my-sft@production", "sft.enabled=false", "prefs.enabled=false",
                "dpo.max_steps=4", "dpo.per_device_batch_size=8", "eval.max_new_tokens=8"]
    args = [str(Path(sys.executable).parent / "dpoflow"), "run", "-c", str(ROOT / "params.yaml"),
            f"--set=run.output_dir={tmp_path}"] + [f"--set={s}" for s in settings]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "user" / "summary.json").read_text())["results"]["beta-0.1"]
    held_out_prompts = json.loads((tmp_path / "user" / "data" / "stats.json").read_text())["splits"]["prompts_eval"]
    assert metrics["n_prompts"] == held_out_prompts > 0 and metrics["n_eval_pairs"] == held_out_prompts
    assert not (tmp_path / "user" / "sft").exists() and not (tmp_path / "user" / "prefs").exists()


def test_an_edited_source_file_is_not_reused(tmp_path):
    from dpoflow.config import load_config
    from dpoflow.runner import _data_fingerprint, content_fingerprint

    source = tmp_path / "pairs.jsonl"
    source.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = load_config(None, [f"data.source={source}"])
    before = _data_fingerprint(cfg)
    source.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')
    assert _data_fingerprint(cfg) != before
    assert content_fingerprint("demo") is None
    assert content_fingerprint("models:/m@champion") != content_fingerprint("models:/m@champion")  # never reused


def _check_mlflow(db, summary):
    """The run is in a real sqlite MLflow store: params, lineage tags, dataset digest, nested β runs with
    per-step DPO metrics under TRL's names and the evaluation metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("dpoflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.data.params["dpo.max_steps"] == "8" and parent.data.params["run.betas"] == "[0.1, 0.5]"
    assert parent.data.tags["dpoflow.config_hash"] == summary["config_hash"]
    assert parent.data.tags["dpoflow.data.md5"] == summary["data"]["input_md5"]
    assert len(parent.data.tags["dpoflow.ref_cache_key"]) == 16
    [dataset_input] = parent.inputs.dataset_inputs
    assert dataset_input.dataset.digest == summary["data"]["input_md5"]
    for child in children:
        name = child.info.run_name
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.metrics["eval/win_rate"] == pytest.approx(summary["results"][name]["win_rate"])
        losses = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in losses] == [5, 8]  # dpo.log_every=5 in params.yaml, last step always
        assert "rewards/margins" in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"report.html", "metrics.json", "train_summary.json"} <= artifacts
