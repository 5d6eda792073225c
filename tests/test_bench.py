"""`dpoflow bench --against trl` on a tiny size: it works and measures at equal math (the speed
figures themselves are benchmarks, never asserted in tests)."""

import json
import signal

import pytest

pytest.importorskip("trl")


@pytest.mark.slow
def test_bench_against_trl_reports_the_headline_keys_at_equal_loss(tmp_path):
    from dpoflow.bench import run_bench

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
    # SFT: the same loss as TRL's SFTTrainer on the same batch; generation: both ways sampled tokens
    sft = report["sft_small_model"]
    assert sft["sft_loss_diff_vs_trl"] <= 1e-4 and abs(sft["results"]["dpoflow sft"]["loss_after_timed_steps"]) > 1
    assert report["sft_speedup_vs_trl_small_model"] == sft["sft_speedup_vs_trl"] > 0
    generation = report["generation"]["results"]
    assert all(result["generated_tokens"] > 8 for result in generation.values())
    assert report["generation_speedup_vs_plain_loop"] > 0


@pytest.mark.slow
def test_scaling_writes_its_table_plot_and_json(tmp_path):
    from dpoflow.bench import run_scaling

    report = run_scaling(str(tmp_path), steps=1, batch=1, lengths=(48, 96), sizes=("17M", "35M"), size_length=48,
                         log=lambda *_: None)
    assert [(row["model"], row["sequence_tokens"]) for row in report["rows"]] == [("17M", 48), ("17M", 96), ("35M", 48)]
    assert json.loads((tmp_path / "scaling.json").read_text()) == report and report["memory"] == "peak RSS"
    for row in report["rows"]:
        assert row["dpoflow"]["s_per_step"] > 0 and row["trl"]["peak_memory_mb"] > 0 and row["speedup_vs_trl"] > 0
    assert (tmp_path / "scaling.md").read_text().count("\n") == 2 + len(report["rows"])
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
