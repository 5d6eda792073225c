"""On-policy rounds through kfp's real local runner, and a run that starts from the registry's champion
(`model.policy_init: models:/…@champion`) in a real sqlite MLflow store."""

import json

import pandas as pd
import pytest

from dpoflow.manifest import model_sha
from dpoflow.pipeline.tasks import stop_reason
from test_pipeline import MODEL, dpoflow_run

ROUNDS = ["run.rounds=2", "run.betas=[0.5]"]


def _mlflow(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rounds")
    return tmp_path, dpoflow_run(tmp_path, *ROUNDS)


@pytest.mark.slow
def test_two_rounds_sample_from_the_previous_policy_and_train_on_from_it(two_rounds):
    tmp_path, result = two_rounds
    root = tmp_path / "tiny"
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["results"]) == {"round-1/beta-0.5", "round-2/beta-0.5"}
    tasks = {t["task"] for t in summary["tasks"]}
    assert {"round-prefs", "round-reference", "dpo", "dpo-2", "evaluate", "evaluate-2", "register"} <= tasks
    # round 1 and round 2 train on disjoint halves of the training prompts
    first, second = (pd.read_parquet(root / p / "train.parquet") for p in ("prefs", "round-2/beta-0.5/prefs"))
    assert len(first) and len(second) and not set(first.prompt) & set(second.prompt)
    stats = json.loads((root / "round-2/beta-0.5/prefs/stats.json").read_text())
    assert stats["shard"] == [1, 2] and stats["train"]["prompts"] == 32 and stats["sampler"] == "round 1 policy"
    # round 2 starts from round 1's policy (by content hash) and keeps the fixed reference's cache key
    round1, round2 = root / "dpo/beta-0.5", root / "round-2/beta-0.5/dpo"
    summary2 = json.loads((round2 / "train_summary.json").read_text())
    assert summary2["init_model_sha"] == model_sha(round1 / "model") != model_sha(round2 / "model")
    assert "init_model_sha" not in json.loads((round1 / "train_summary.json").read_text())
    # every round is evaluated against the fixed reference, with diversity next to the reward
    for name, metrics in summary["results"].items():
        assert metrics["round"] == int(name[6]) and metrics["n_prompts"] == 24
        assert 0 < metrics["distinct_2_policy"] <= 1 and 0 <= metrics["repetition_policy"] <= 1
        assert metrics["diversity_ratio"] == pytest.approx(metrics["distinct_2_policy"] / metrics["distinct_2_reference"])
    frontier = json.loads((root / "frontier/frontier.json").read_text())
    assert [(row["round"], row["beta"]) for row in frontier] == [(1, 0.5), (2, 0.5)]
    assert "Per round" in (root / "frontier/frontier.html").read_text()
    # MLflow: one nested run per round and β; the registered version is the last round's policy
    mlflow = _mlflow(tmp_path)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["dpoflow"], output_format="list")}
    assert {"round-1/beta-0.5", "round-2/beta-0.5"} <= set(runs)
    assert runs["round-2/beta-0.5"].data.tags["dpoflow.round"] == "2"
    assert runs["round-2/beta-0.5"].data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    assert runs["round-2/beta-0.5"].data.metrics["eval/distinct_2_policy"] > 0
    version = summary["registry"]["candidates"]["beta-0.5"]
    tags = mlflow.MlflowClient().get_model_version(MODEL, version).tags
    assert tags["dpoflow.round"] == "2" and tags["dpoflow.model_sha"] == model_sha(round2 / "model")


@pytest.mark.slow
def test_collapsed_diversity_stops_the_rounds_and_keeps_the_policy(two_rounds):
    """A floor no policy can clear: round 2 does not train; its policy is round 1's, and says why."""
    tmp_path, _ = two_rounds
    result = dpoflow_run(tmp_path, *ROUNDS, "run.min_diversity=50")
    assert result.stdout.count(": reused") == 6  # data sft prefs reference + round 1's dpo and eval
    root = tmp_path / "tiny"
    metrics = json.loads((root / "round-2/beta-0.5/eval/metrics.json").read_text())
    assert "below run.min_diversity=50" in metrics["stopped"]
    assert model_sha(root / "round-2/beta-0.5/dpo/model") == model_sha(root / "dpo/beta-0.5/model")
    assert json.loads((root / "round-2/beta-0.5/dpo/train_summary.json").read_text())["steps"] == 0
    assert "STOPPED: round 1's policy samples have distinct-2" in result.stdout


def test_stop_reason_rule():
    ok = {"round": 1, "distinct_2_policy": 0.6, "distinct_2_reference": 0.8, "diversity_ratio": 0.75}
    assert stop_reason(ok, 0.5) == ""
    collapsed = {**ok, "distinct_2_policy": 0.2, "diversity_ratio": 0.25}
    assert "0.25 x the reference's 0.800, below run.min_diversity=0.5" in stop_reason(collapsed, 0.5)
    assert stop_reason({"stopped": "earlier"}, 0.0) == "earlier"  # once stopped, later rounds stay stopped


@pytest.mark.slow
def test_run_starts_from_the_champion_with_the_reference_fixed(two_rounds):
    """Scheduled retraining: model.policy_init = models:/<name>@champion. The champion (a registered
    version in a real sqlite store) samples the pairs and is where DPO starts; the reference stays the
    SFT model; the new version records the pinned version it continued from."""
    tmp_path, _ = two_rounds
    mlflow = _mlflow(tmp_path)
    client = mlflow.MlflowClient()
    champion = json.loads((tmp_path / "tiny/summary.json").read_text())["registry"]["candidates"]["beta-0.5"]
    client.set_registered_model_alias(MODEL, "champion", champion)
    champion_sha = client.get_model_version(MODEL, champion).tags["dpoflow.model_sha"]

    dpoflow_run(tmp_path, "run.name=continued", "run.betas=[0.5]", f"model.policy_init=models:/{MODEL}@champion")
    root = tmp_path / "continued"
    train = json.loads((root / "dpo/beta-0.5/train_summary.json").read_text())
    assert train["init_model_sha"] == champion_sha
    assert train["reference_cache_key"] == json.loads((root / "reference/reference.json").read_text())["cache_key"]
    summary = json.loads((root / "summary.json").read_text())
    version = summary["registry"]["candidates"]["beta-0.5"]
    assert client.get_model_version(MODEL, version).tags["dpoflow.policy_init"] == f"models:/{MODEL}/{champion}"
    # the pairs were sampled from that same champion version
    assert json.loads((root / "prefs/stats.json").read_text())["sampler"] == f"models:/{MODEL}/{champion}"
