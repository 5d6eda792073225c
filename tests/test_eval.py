"""Evaluation math and a real evaluation of a model against itself."""

import pytest

from dpoflow.config import DataConfig, EvalConfig
from dpoflow.data.step import run_data
from dpoflow.evaluation.evaluate import run_eval, win_rate_from_verdicts
from dpoflow.evaluation.stats import bootstrap_mean_interval, wilson_interval


def test_wilson_interval_known_values():
    # published Wilson 95 % intervals (e.g. Newcombe 1998, Table I style values)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_ties_count_half():
    result = win_rate_from_verdicts([1.0, 1.0, 0.5, 0.5, 0.0])
    assert result["win_rate"] == pytest.approx(0.6)
    assert (result["wins"], result["ties"], result["losses"], result["n_prompts"]) == (2, 2, 1, 5)
    assert (result["win_rate_ci_low"], result["win_rate_ci_high"]) == pytest.approx(wilson_interval(3, 5))


def test_bootstrap_interval_covers_the_mean():
    values = [float(i % 7) for i in range(200)]
    low, high = bootstrap_mean_interval(values)
    mean = sum(values) / len(values)
    assert low < mean < high and high - low < 1.0


def test_model_against_itself(tmp_path, tiny_model_dir):
    run_data(DataConfig(demo={"n_reviews": 400}, eval_fraction=0.5), tmp_path / "data")
    metrics = run_eval(EvalConfig(max_prompts=60, max_new_tokens=16), tiny_model_dir, tiny_model_dir,
                       tmp_path / "data", tmp_path / "eval", beta=0.1)
    # identical models + identical seeds = identical samples: every item a tie, KL exactly ~0
    assert metrics["ties"] == metrics["n_prompts"] == 60 and metrics["win_rate"] == 0.5
    assert abs(metrics["kl"]) < 1e-4 and metrics["reward_margin"] == 0.0
    assert metrics["length_policy"] == metrics["length_reference"]
    assert (tmp_path / "eval" / "samples.parquet").exists()
