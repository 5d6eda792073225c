"""Evaluation math and a real evaluation of a model against itself."""

import pytest

from conftest import full_logit_logp
from dpoflow.config import DataConfig, EvalConfig
from dpoflow.data.step import run_data
from dpoflow.evaluation.evaluate import run_eval
from dpoflow.evaluation.stats import (
    bootstrap_mean_interval,
    reward_margin_summary,
    wilson_interval,
    win_rate_summary,
)


@pytest.mark.parametrize("verdicts, rate, low, high", [
    ([0.0] * 12, 0.0, 0.0, 0.2425),       # 0 of n: the lower bound is exactly 0
    ([1.0] * 332, 1.0, 0.9886, 1.0),      # n of n (the demo's round 2): the upper bound is exactly 1
    ([0.5] * 9, 0.5, 0.2265, 0.7735),     # all ties: centred on ½
    ([1.0], 1.0, 0.2065, 1.0),            # n = 1
    ([], 0.0, 0.0, 1.0),                  # n = 0: nothing known
])
def test_win_rate_interval_edges_hold_the_rate_and_draw(verdicts, rate, low, high):
    from dpoflow.evaluation.report import _win_rate_plot

    result = win_rate_summary(verdicts)
    assert result["win_rate"] == rate and result["n_prompts"] == len(verdicts)
    assert (result["win_rate_ci_low"], result["win_rate_ci_high"]) == pytest.approx((low, high), abs=1e-4)
    assert result["win_rate_ci_low"] <= result["win_rate"] <= result["win_rate_ci_high"]  # exactly, no rounding
    if rate in (0.0, 1.0) and verdicts:
        assert (result["win_rate_ci_low"] if rate == 0.0 else result["win_rate_ci_high"]) == rate
    assert _win_rate_plot(result).startswith("<img")  # a perfect (or empty) result draws; it crashed before


def test_wilson_interval_known_values():
    # published Wilson 95 % intervals (e.g. Newcombe 1998, Table I style values)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_ties_count_half():
    result = win_rate_summary([1.0, 1.0, 0.5, 0.5, 0.0])
    assert result["win_rate"] == pytest.approx(0.6)
    assert (result["wins"], result["ties"], result["losses"], result["n_prompts"]) == (2, 2, 1, 5)
    assert (result["win_rate_ci_low"], result["win_rate_ci_high"]) == pytest.approx(wilson_interval(3, 5))


def test_bootstrap_interval_covers_the_mean():
    values = [float(i % 7) for i in range(200)]
    low, high = bootstrap_mean_interval(values)
    mean = sum(values) / len(values)
    assert low < mean < high and high - low < 1.0


@pytest.mark.parametrize("policy, reference, margin, low, high", [
    ([], [], 0.0, 0.0, 0.0),                          # n = 0
    ([0.9], [0.4], 0.5, 0.5, 0.5),                    # n = 1: one margin, no spread to resample
    ([0.7] * 6, [0.2] * 6, 0.5, 0.5, 0.5),            # every margin equal
    ([1.0, 0.0] * 20, [0.0] * 40, 0.5, 0.35, 0.65),   # half 1, half 0: about ±1.96 x 0.5/sqrt(40)
])
def test_reward_margin_interval_edges(policy, reference, margin, low, high):
    result = reward_margin_summary(policy, reference)
    assert result["reward_margin"] == pytest.approx(margin)
    assert (result["reward_margin_ci_low"], result["reward_margin_ci_high"]) == pytest.approx((low, high), abs=0.02)
    assert result["reward_margin_ci_low"] <= result["reward_margin"] <= result["reward_margin_ci_high"]


def test_model_against_itself(tmp_path, tiny_model_dir):
    run_data(DataConfig(demo={"n_reviews": 400}, eval_fraction=0.5), tmp_path / "data")
    metrics = run_eval(EvalConfig(max_prompts=60, max_new_tokens=16), tiny_model_dir, tiny_model_dir,
                       tmp_path / "data", tmp_path / "eval", beta=0.1)
    # identical models + identical seeds = identical samples: every item a tie, KL exactly ~0
    assert metrics["ties"] == metrics["n_prompts"] == 60 and metrics["win_rate"] == 0.5
    assert abs(metrics["kl"]) < 1e-4 and metrics["reward_margin"] == 0.0
    assert metrics["length_policy"] == metrics["length_reference"]
    assert (tmp_path / "eval" / "samples.parquet").exists()


def test_report_contains_the_plots(tmp_path):
    html = (tmp_path / "eval_report.html")
    import pandas as pd

    from dpoflow.evaluation.report import write_frontier, write_report

    (tmp_path / "metrics.jsonl").write_text("".join(
        f'{{"step": {s}, "loss": {0.69 - s / 100}, "rewards/margins": {s / 10}, "rewards/accuracies": 0.5, "grad_norm": 1.0}}\n'
        for s in range(1, 6)))
    samples = pd.DataFrame({"prompt": ["a <b>"], "policy": ["x"], "reference": ["y"], "policy_score": [0.5],
                            "reference_score": [0.1], "verdict": [1.0]})
    metrics = {"win_rate": 0.8, "win_rate_ci_low": 0.6, "win_rate_ci_high": 0.9, "beta": 0.1, "kl": 2.0}
    text = write_report(html, metrics, samples, tmp_path / "metrics.jsonl").read_text()
    assert text.count("data:image/png;base64,") == 3  # win rate, rewards, training curves
    assert "Training curves" in text and "a &lt;b&gt;" in text  # user text is escaped
    frontier = write_frontier(tmp_path / "f", {"beta-0.1": {**metrics, "reward_policy": 0.7},
                                               "beta-0.5": {**metrics, "beta": 0.5, "kl": 0.5, "reward_policy": 0.3}})
    assert [row["beta"] for row in frontier["frontier"]] == [0.5, 0.1]  # sorted by KL
    assert "data:image/png;base64," in (tmp_path / "f" / "frontier.html").read_text()


def test_evaluate_modules_load_offline(monkeypatch):
    import evaluate

    from dpoflow.evaluation.metrics import METRICS_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    win_rate = evaluate.load(str(METRICS_DIR / "win_rate"))
    assert win_rate.compute(verdicts=[1.0, 0.5, 0.0, 1.0])["win_rate"] == 0.625
    margin = evaluate.load(str(METRICS_DIR / "reward_margin"))
    result = margin.compute(policy_scores=[1.0, 0.5], reference_scores=[0.0, 0.1])
    assert result["reward_margin"] == pytest.approx(0.7)


def test_reward_model_judge(tmp_path, tiny_model_dir):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dpoflow.evaluation.judges import load_judge
    from dpoflow.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = load_judge(f"reward_model:{tmp_path / 'rm'}")
    prompts, completions = ["the film", "the film", "a"], [" was great", " was dull", " fun"]
    scores = judge.score(prompts, completions)
    assert len(scores) == 3 and len(set(scores)) == 3  # real, distinct model outputs
    # batching with padding does not change a score
    assert judge.score(prompts[:1], completions[:1])[0] == pytest.approx(scores[0], abs=1e-5)
    assert judge.compare(prompts[:2], completions[:2], completions[1::-1]) == (
        [1.0, 0.0] if scores[0] > scores[1] else [0.0, 1.0])


def test_unknown_judge_is_a_clear_error():
    from dpoflow.evaluation.judges import load_judge

    with pytest.raises(ValueError, match="unknown judge 'gpt'"):
        load_judge("gpt")
    with pytest.raises(ValueError, match="cannot import judge callable"):
        load_judge("callable:nowhere.module:f")
    with pytest.raises(ValueError, match="needs eval.llm_judge.base_url"):
        load_judge("llm")


def test_kl_is_estimated_at_temperature_one_on_sampled_ids(tmp_path, tiny_model_dir):
    """KL(π‖π_ref) recomputed from samples.parquet's own ids with full-logit forwards (float64) equals
    each sample's log-ratio (3e-5, fp32's resolution) and the reported KL (1e-5); it does not depend
    on the judging temperature (the KL samples are always drawn at temperature 1); a model against
    itself has KL 0."""
    import pandas as pd

    from dpoflow.lm.logprobs import tokenize_prompt
    from dpoflow.modeling import build_model, load_model, load_tokenizer

    other = tmp_path / "other"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    build_model(tokenizer, "tiny", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    run_data(DataConfig(demo={"n_reviews": 400}, eval_fraction=0.5), tmp_path / "data")
    results = [run_eval(EvalConfig(max_prompts=40, max_new_tokens=12, temperature=t), other, tiny_model_dir,
                        tmp_path / "data", tmp_path / f"eval{t}", beta=0.1)["kl"] for t in (0.7, 0.3)]
    assert results[0] == pytest.approx(results[1], rel=1e-6)

    samples = pd.read_parquet(tmp_path / "eval0.7" / "samples.parquet")
    prompts = pd.read_parquet(tmp_path / "data" / "prompts_eval.parquet").head(40)
    assert samples.prompt.tolist() == prompts.prompt.tolist()
    policy, reference = load_model(str(other)), load_model(str(tiny_model_dir))
    recomputed = []
    for text, messages, ids in zip(prompts.prompt, prompts.prompt_messages, samples.kl_completion_ids):
        prompt = tokenize_prompt(tokenizer, text, messages)
        recomputed.append(full_logit_logp(policy, prompt, list(ids)) - full_logit_logp(reference, prompt, list(ids)))
    # each log-ratio is a difference of two fp32 sums near -100 (one fp32 step there: 7.6e-6)
    assert recomputed == pytest.approx(samples.kl_sample_logratio.tolist(), abs=3e-5)
    assert sum(recomputed) / len(recomputed) == pytest.approx(results[0], abs=1e-5) and results[0] > 0.05
    itself = run_eval(EvalConfig(max_prompts=40, max_new_tokens=12), tiny_model_dir, tiny_model_dir, tmp_path / "data",
                      tmp_path / "self", beta=0.1)
    assert itself["kl"] == 0.0


