"""`dpoflow bench --against trl` on a tiny size: it works and measures at equal math (the speed
figures themselves are benchmarks, never asserted in tests)."""

import json
import signal

import pytest


@pytest.mark.slow
def test_bench_against_trl_reports_the_headline_keys_at_equal_loss(tmp_path):
    from dpoflow_bench.suites import run_bench

    ctrl_c = signal.getsignal(signal.SIGINT)
    report = run_bench(steps=2, batch=2, cases=["standard"], contenders=["dpoflow", "trl"], repeats=1,
                       out=str(tmp_path / "bench.json"), sft_presets=("small",), generate_prompts=8, log=lambda *_: None)
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # the bench leaves Ctrl-C as it found it
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    results = report["cases"]["standard"]["results"]
    assert results["trl"]["loss_diff_vs_trl"] == 0.0
    assert results["dpoflow"]["loss_diff_vs_trl"] <= 1e-4  # the same math: same loss after the timed steps
    assert abs(results["dpoflow"]["loss_after_timed_steps"] - 0.6931) > 1e-3  # training moved it off ln 2
    assert report["speedup_vs_trl"] == pytest.approx(results["trl"]["s_per_step"] / results["dpoflow"]["s_per_step"],
                                                     rel=1e-2)
    assert 0 < report["mfu"] < 1 and report["rss_ratio_vs_trl"] > 0 and report["loss_equal_to_trl_within_1e-4"]
    setting = report["cases"]["standard"]["setting"]
    assert 90 <= setting["prompt_tokens_mean"] <= 100 and setting["useful_gflop_per_step"] > 0
    # TRL's padded layout does more FLOPs; the target is 0.95 x that ratio (no precompute contender ran here)
    assert setting["trl_gflop_per_step"] > setting["trl_precompute_gflop_per_step"] > setting["useful_gflop_per_step"]
    assert report["speedup_vs_trl_precompute_flop_target"] == pytest.approx(
        0.95 * setting["trl_precompute_gflop_per_step"] / setting["useful_gflop_per_step"], abs=1e-3)
    assert report["speedup_vs_trl_precompute_flop_target_met"] is None
    # SFT: the same loss as TRL's SFTTrainer on the same batch; generation: both ways sampled tokens
    sft = report["sft_small_model"]
    assert sft["sft_loss_diff_vs_trl"] <= 1e-4 and abs(sft["results"]["dpoflow sft"]["loss_after_timed_steps"]) > 1
    assert report["sft_speedup_vs_trl_small_model"] == sft["sft_speedup_vs_trl"] > 0
    assert sft["sft_flop_target_met"] == (sft["sft_speedup_vs_trl"] >= sft["sft_flop_target"]) and sft["sft_flop_target"] > 0
    generation = report["generation"]["results"]
    assert all(result["generated_tokens"] > 8 for result in generation.values())
    assert report["generation_speedup_vs_plain_loop"] > 0


@pytest.mark.slow
def test_scaling_writes_its_table_plot_and_json(tmp_path):
    from dpoflow_bench.scaling import run_scaling

    report = run_scaling(str(tmp_path), steps=1, batch=1, lengths=(48, 96), sizes=("17M", "35M"), size_length=48,
                         log=lambda *_: None)
    assert [(row["model"], row["sequence_tokens"]) for row in report["rows"]] == [("17M", 48), ("17M", 96), ("35M", 48)]
    assert json.loads((tmp_path / "scaling.json").read_text()) == report and report["memory"] == "peak RSS"
    for row in report["rows"]:
        assert row["dpoflow"]["s_per_step"] > 0 and row["trl"]["peak_memory_mb"] > 0 and row["speedup_vs_trl"] > 0
    assert (tmp_path / "scaling.md").read_text().count("\n") == 2 + len(report["rows"])
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_vocab_sweep_measures_every_step_at_equal_loss_on_a_real_shape(tmp_path):
    """The Qwen2.5 shape (q/k/v biases, tied head) at two vocabularies, one layer: every contender
    ran, DPO and SFT losses equal TRL's, and the table has a line per contender."""
    from dpoflow_bench.vocab import run_vocab

    report = run_vocab(str(tmp_path), layers=1, vocabularies=(2000, 6000), batch=1, lengths=(8, 8), steps=1,
                       sft_batch=2, generate={"prompts": 2, "samples": 2, "max_new_tokens": 3, "top_p": 0.9},
                       fit=False, log=lambda *_: None)
    assert json.loads((tmp_path / "vocab.json").read_text()) == report
    small, large = report["rows"]
    assert large["parameters_m"] > small["parameters_m"] and large["setting"]["parameters_m"] == large["parameters_m"]
    for row in report["rows"]:
        for group in ("dpo", "sft"):
            for name, result in row[group].items():
                assert result["loss_diff_vs_trl"] <= 1e-4, (row["vocab"], name, result)
                assert result["s_per_step"] > 0 and result["peak_memory_mb"] > 0
        assert row["reference"]["seconds"] > 0
        assert all(result["tokens"] == 2 * 2 * 3 for result in row["generate"].values())
    assert (tmp_path / "vocab.md").read_text().count("| 6000 |") == 8  # reference, 3 DPO, 2 SFT, 2 sampling
    assert (tmp_path / "vocab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
