"""DPO engine: losses by hand, log-prob masking, ln 2 at step 1, invariances, cache == live,
prefix sharing == concatenated, exact resume after SIGKILL, LoRA, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_weights, vouch, weights
from dpoflow.config import DpoConfig
from dpoflow.dpo.losses import preference_loss, sft_loss
from dpoflow.dpo.pairs import TruncationError, collate_pairs, tokenize_pairs
from dpoflow.dpo.reference import ReferenceCacheError, run_reference
from dpoflow.dpo.train import run_dpo
from dpoflow.lm.logprobs import IGNORE, SequenceLogProbs, collate_shared_prefix
from dpoflow.modeling import load_model, load_tokenizer

BIN = Path(sys.executable).parent
T = torch.tensor


# --- losses, worked by hand (see the losses.py docstring) ----------------------------------------
def _worked(loss_type, **kw):
    losses, chosen, rejected = preference_loss(T([-10.0]), T([-14.0]), T([-12.0]), T([-12.0]), beta=0.1,
                                               loss_type=loss_type, **kw)
    return losses.item(), chosen.item(), rejected.item()


def test_sigmoid_by_hand():
    loss, chosen, rejected = _worked("sigmoid")
    assert loss == pytest.approx(math.log(1 + math.exp(-0.4)), abs=1e-6) and loss == pytest.approx(0.513015, abs=1e-6)
    assert (chosen, rejected) == pytest.approx((0.2, -0.2))


def test_hinge_cdpo_robust_by_hand():
    assert _worked("hinge")[0] == pytest.approx(0.6)
    # cdpo ε=0.1: 0.9·0.513015 + 0.1·0.913015 = 0.553015
    assert _worked("cdpo", label_smoothing=0.1)[0] == pytest.approx(0.553015, abs=1e-6)
    # robust ε=0.1: (0.9·0.513015 − 0.1·0.913015)/0.8 = 0.463015
    assert _worked("robust", label_smoothing=0.1)[0] == pytest.approx(0.463015, abs=1e-6)


def test_ipo_by_hand_uses_length_averaged_ratios():
    # log-ratios 2 and −2 over 4 and 2 tokens: h̄ = 0.5 + 1 = 1.5; (1.5 − 5)² = 12.25
    losses, _, _ = preference_loss(T([-10.0]), T([-14.0]), T([-12.0]), T([-12.0]), beta=0.1, loss_type="ipo",
                                   chosen_lengths=T([4.0]), rejected_lengths=T([2.0]))
    assert losses.item() == pytest.approx(12.25)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        preference_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, loss_type="ipo")


def test_sft_term_and_unknown_loss():
    assert sft_loss(T([-6.0]), T([3.0])).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo2'"):
        preference_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.1, loss_type="dpo2")


# --- log-probs --------------------------------------------------------------------------------------
def test_batch_layout_and_masking(tiny_model_dir):
    import pandas as pd

    tokenizer = load_tokenizer(str(tiny_model_dir))
    frame = pd.DataFrame({"prompt": ["the film", "a"], "chosen": [" was great", " fun"], "rejected": [" dull", " boring it was"]})
    pairs = tokenize_pairs(frame, tokenizer, 64)
    batch = collate_pairs(pairs, [0, 1], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen_0, chosen_1, rejected_0, rejected_1
    for row, (prompt, completion) in enumerate([(0, pairs.chosen_ids[0]), (1, pairs.chosen_ids[1]),
                                                (0, pairs.rejected_ids[0]), (1, pairs.rejected_ids[1])]):
        n_prompt = len(pairs.prompt_ids[prompt])
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == IGNORE).all()
        assert labels[n_prompt:n_prompt + len(completion)].tolist() == completion
        assert (labels[n_prompt + len(completion):] == IGNORE).all()
        assert completion[-1] == tokenizer.eos_token_id

    # summed log-probs equal a brute-force full-logits computation on completion tokens only
    model = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        sums, counts = SequenceLogProbs(model)(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected = (token * (labels != IGNORE)).sum(-1)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=0)
    assert counts.tolist() == [len(c) for c in pairs.chosen_ids + pairs.rejected_ids]

    for pack, blocks in ((False, False), (True, False), (True, True)):
        layout = collate_shared_prefix(pairs, [0, 1], tokenizer.pad_token_id, pack=pack, blocks=blocks)
        with torch.no_grad():
            shared, shared_counts = SequenceLogProbs(model)(layout)
        torch.testing.assert_close(shared, sums, atol=1e-5, rtol=0)
        assert shared_counts.tolist() == counts.tolist()


def test_split_by_tokens_balances_parts():
    from dpoflow.dpo.train import split_by_tokens

    lengths = [50, 10, 40, 30, 20, 60]
    assert split_by_tokens(list(range(6)), lengths, 0) == split_by_tokens(list(range(6)), lengths, 210) == [list(range(6))]
    parts = split_by_tokens(list(range(6)), lengths, 100)  # 210 tokens -> 3 parts of 70
    assert sorted(i for part in parts for i in part) == list(range(6))
    assert [sum(lengths[i] for i in part) for part in parts] == [70, 70, 70]
    assert split_by_tokens([0, 1], lengths, 5) == [[0], [1]]  # never more parts than pairs


def test_packing_fills_rows_and_scores_like_unpacked(tiny_model_dir):
    import pandas as pd

    from dpoflow.lm.logprobs import pack_rows, score_sequences

    assert pack_rows([5, 3, 2, 4, 1]) == [[0], [3, 4], [1, 2]]  # first-fit decreasing, rows <= the longest
    assert pack_rows([2, 2, 2], capacity=4) == [[0, 1], [2]]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    words = "the film was great fun and a bit long but never dull".split()
    frame = pd.DataFrame({"prompt": [" ".join(words[: 1 + i % 7]) for i in range(12)],
                          "chosen": [" " + " ".join(words[i % 5: i % 5 + 1 + i % 4]) for i in range(12)],
                          "rejected": [" " + " ".join(words[: 1 + (3 * i) % 6]) for i in range(12)]})
    pairs = tokenize_pairs(frame, tokenizer, 64)
    model = load_model(str(tiny_model_dir)).eval()
    packed = collate_shared_prefix(pairs, range(12), tokenizer.pad_token_id)
    width = packed["input_ids"].shape[1]
    assert width == max(len(p) + len(c) + len(r) for p, c, r in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids))
    assert packed["input_ids"].shape[0] < 12
    padding = (packed["input_ids"] == tokenizer.pad_token_id).float().mean().item()
    unpacked = collate_shared_prefix(pairs, range(12), tokenizer.pad_token_id, pack=False)
    assert padding < (unpacked["input_ids"] == tokenizer.pad_token_id).float().mean().item()
    blocks = collate_shared_prefix(pairs, range(12), tokenizer.pad_token_id, blocks=True)  # one row, no padding
    assert blocks["input_ids"].shape == (1, sum(pairs.forward_tokens(shared_prefix=True)))
    assert "attention_mask" not in blocks
    with torch.no_grad():
        a, a_counts = SequenceLogProbs(model)(packed)
        b, b_counts = SequenceLogProbs(model)(unpacked)
        c, c_counts = SequenceLogProbs(model)(collate_pairs(pairs, range(12), tokenizer.pad_token_id))
        d, d_counts = SequenceLogProbs(model)(blocks)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(d, c, atol=1e-5, rtol=0)
    assert a_counts.tolist() == b_counts.tolist() == c_counts.tolist() == d_counts.tolist()
    # single completions (evaluation's KL, the reference of generated samples) go through the same layout
    sums, counts = score_sequences(model, pairs.prompt_ids, pairs.rejected_ids, tokenizer.pad_token_id, batch_size=5)
    torch.testing.assert_close(sums, c[12:], atol=1e-5, rtol=0)
    assert counts.tolist() == c_counts[12:].tolist()


def test_truncation_counted_and_errors(tiny_model_dir):
    import pandas as pd

    tokenizer = load_tokenizer(str(tiny_model_dir))
    frame = pd.DataFrame({"prompt": ["the film", "a"], "chosen": [" was great " * 20, " fun"], "rejected": [" dull", " no"]})
    assert tokenize_pairs(frame, tokenizer, 24).truncated == 1
    with pytest.raises(TruncationError, match=r"prompt 'the film'... is \d+ tokens > max_length=24"):
        tokenize_pairs(frame, tokenizer, 24, truncation="error")
    # a prompt that alone fills max_length keeps its last half: the completions still get trained on
    long_prompt = pd.DataFrame({"prompt": ["the film was " * 30], "chosen": [" a"], "rejected": [" b"]})
    pairs = tokenize_pairs(long_prompt, tokenizer, 24)
    assert pairs.truncated == 1 and len(pairs.prompt_ids[0]) == 12 and len(pairs.chosen_ids[0]) >= 1
    assert len(pairs.prompt_ids[0]) + len(pairs.chosen_ids[0]) <= 24


# --- training ---------------------------------------------------------------------------------------
def _cfg(**kw):
    base = dict(max_steps=5, per_device_batch_size=8, learning_rate=1e-2, max_length=64, log_every=1, seed=3)
    return DpoConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, pairs_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("reference")
    run_reference(pairs_dir, tiny_model_dir, out, max_length=64)
    return out


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]



def test_step_one_loss_is_ln2_and_metric_names(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    run_dpo(_cfg(max_steps=3), pairs_dir, tiny_model_dir, tmp_path / "out", reference_dir=reference_dir)
    metrics = _metrics(tmp_path / "out")
    assert abs(metrics[0]["loss"] - math.log(2)) < 1e-6
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert set(metrics[0]) == {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                               "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"}
    assert metrics[-1]["loss"] < metrics[0]["loss"] and metrics[-1]["rewards/margins"] > 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["pairs"] == 16
    assert json.loads((tmp_path / "out" / "timing.json").read_text())["tokens_per_s"] > 0


# Adam turns float noise in near-zero gradients into steps of size ~lr, so the invariance runs use a
# small learning rate; the weights must then agree to 1e-5. Adam with clipping barely sees a constant
# factor on the gradient, so each step's grad_norm (taken before clipping) is compared too: a lost
# 1/len(micro) or 1/world scaling doubles it.
def _same_steps(a: Path, b: Path, *keys: str) -> None:
    first, second = _metrics(a), _metrics(b)
    assert len(first) == len(second) > 0
    for x, y in zip(first, second):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (x["step"], "grad_norm")
        for key in keys:
            assert x[key] == pytest.approx(y[key], abs=1e-5), (x["step"], key)


def test_gradient_accumulation_invariance(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    run_dpo(_cfg(learning_rate=1e-3), pairs_dir, tiny_model_dir, tmp_path / "b8", reference_dir=reference_dir)
    run_dpo(_cfg(learning_rate=1e-3, per_device_batch_size=4, gradient_accumulation_steps=2), pairs_dir, tiny_model_dir,
            tmp_path / "b4x2", reference_dir=reference_dir)
    _same_steps(tmp_path / "b8", tmp_path / "b4x2", "loss")
    assert_same_weights(tmp_path / "b8", tmp_path / "b4x2", atol=1e-5)


@pytest.mark.slow
def test_two_processes_gloo_equal_one(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    """With a warmup and a decay: the schedule advances once per optimizer step whatever the number of
    processes (accelerate's prepared scheduler steps once per process by default: 2 processes would
    warm up in half the steps and decay twice as fast)."""
    schedule = dict(learning_rate=1e-3, warmup_steps=2, scheduler="linear")
    run_dpo(_cfg(**schedule), pairs_dir, tiny_model_dir, tmp_path / "one", reference_dir=reference_dir)
    command = [str(BIN / "dpoflow"), "dpo", "--num-processes", "2", "--pairs", str(pairs_dir),
               "--reference-model", str(tiny_model_dir), "--reference-dir", str(reference_dir), "--out",
               str(tmp_path / "two")] + [f"--set=dpo.{k}={v}" for k, v in
                                         dict(max_steps=5, per_device_batch_size=4, max_length=64, seed=3,
                                              log_every=1, **schedule).items()]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["processes"] == 2
    assert [m["learning_rate"] for m in _metrics(tmp_path / "two")] == pytest.approx(
        [1e-3 / 3, 2e-3 / 3, 1e-3, 2e-3 / 3, 1e-3 / 3], abs=1e-8)  # warmup (s+1)/3, then linear to 0 at step 5
    _same_steps(tmp_path / "one", tmp_path / "two", "loss", "rewards/margins", "learning_rate")
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)


def test_cached_reference_equals_live_and_prefix_sharing_equals_concat(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    concat = {"prefix_sharing": False}
    run_dpo(_cfg(**concat), pairs_dir, tiny_model_dir, tmp_path / "cached", reference_dir=reference_dir)
    run_dpo(_cfg(reference="live", **concat), pairs_dir, tiny_model_dir, tmp_path / "live")
    run_dpo(_cfg(prefix_sharing=True), pairs_dir, tiny_model_dir, tmp_path / "shared", reference_dir=reference_dir)
    run_dpo(_cfg(reference="live", prefix_sharing=True), pairs_dir, tiny_model_dir, tmp_path / "live-shared")
    run_dpo(_cfg(packing=False), pairs_dir, tiny_model_dir, tmp_path / "unpacked", reference_dir=reference_dir)
    # every micro-batch cut into parts of <= 40 tokens (3+ forwards each): the same update
    run_dpo(_cfg(max_forward_tokens=40), pairs_dir, tiny_model_dir, tmp_path / "parts", reference_dir=reference_dir)
    run_dpo(_cfg(max_forward_tokens=40, prefix_sharing=False), pairs_dir, tiny_model_dir, tmp_path / "parts-concat",
            reference_dir=reference_dir)
    for other in ("live", "shared", "live-shared", "unpacked", "parts", "parts-concat"):
        for a, b in zip(_metrics(tmp_path / "cached"), _metrics(tmp_path / other)):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), other
        assert_same_weights(tmp_path / "cached", tmp_path / other, atol=1e-4)


def test_memory_budgets_cut_the_work_never_the_numbers(tmp_path, pairs_dir, tiny_model_dir, reference_dir,
                                                       monkeypatch):
    """Budgets so small that each micro-batch runs in parts, with the head either keeping each part's
    logits for the backward (sized into the activation budget) or, with the logit budget set too, a
    few tokens at a time, recomputed in the backward: the same losses, gradient norms and weights as
    the defaults, where this tiny model's micro-batch is one forward with every logit kept."""
    from dpoflow.lm import head
    from dpoflow.memory import activation_budget, activation_bytes_per_token, logit_budget

    recomputed = []
    logits = head._logits
    monkeypatch.setattr(head, "_logits", lambda *args: recomputed.append(1) or logits(*args))
    model = load_model(str(tiny_model_dir))
    tokens = 8 * 2 * 64  # a micro-batch's tokens at most
    assert activation_budget(model) > tokens * activation_bytes_per_token(model.config, 4)  # default: one forward
    run_dpo(_cfg(learning_rate=1e-3), pairs_dir, tiny_model_dir, tmp_path / "default", reference_dir=reference_dir)
    monkeypatch.setenv("DPOFLOW_ACTIVATION_BUDGET_MB", str(60 * activation_bytes_per_token(model.config, 4) / 2 ** 20))
    run_dpo(_cfg(learning_rate=1e-3), pairs_dir, tiny_model_dir, tmp_path / "parts", reference_dir=reference_dir)
    assert not recomputed  # every part kept its logits
    monkeypatch.setenv("DPOFLOW_LOGIT_BUDGET_MB", str(3 * model.config.vocab_size * 8 / 2 ** 20))  # 3 tokens
    assert logit_budget(model) // (model.config.vocab_size * 8) == 3
    run_dpo(_cfg(learning_rate=1e-3), pairs_dir, tiny_model_dir, tmp_path / "small", reference_dir=reference_dir)
    assert recomputed
    for other in ("parts", "small"):
        for a, b in zip(_metrics(tmp_path / "default"), _metrics(tmp_path / other), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert_same_weights(tmp_path / "default", tmp_path / other, atol=1e-5)


def test_reference_cache_reuse_and_mismatch(tmp_path, pairs_dir, tiny_model_dir):
    said = []
    first = run_reference(pairs_dir, tiny_model_dir, tmp_path / "a", max_length=64, cache_dir=tmp_path / "cache", log=said.append)
    second = run_reference(pairs_dir, tiny_model_dir, tmp_path / "b", max_length=64, cache_dir=tmp_path / "cache",
                           log=said.append)
    assert not first.reused and second.reused and first.cache_key == second.cache_key
    assert "cache hit" in said[-1]
    with pytest.raises(ReferenceCacheError, match="were computed for other inputs"):
        run_dpo(_cfg(max_length=32), pairs_dir, tiny_model_dir, tmp_path / "x", reference_dir=tmp_path / "a")
    with pytest.raises(ReferenceCacheError, match="run `dpoflow reference` first"):
        run_dpo(_cfg(), pairs_dir, tiny_model_dir, tmp_path / "y", reference_dir=tmp_path / "missing")


def test_lora_reference_is_base_and_only_adapters_change(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    cfg = _cfg(reference="lora_disabled", lora={"enabled": True, "r": 4, "alpha": 8})
    run_dpo(cfg, pairs_dir, tiny_model_dir, tmp_path / "lora")
    cached = run_dpo(_cfg(lora={"enabled": True, "r": 4, "alpha": 8}), pairs_dir, tiny_model_dir, tmp_path / "lc",
                     reference_dir=reference_dir)
    assert cached
    # adapters-off reference == the base model's cached log-probs: identical losses at every step
    for a, b in zip(_metrics(tmp_path / "lora"), _metrics(tmp_path / "lc")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    adapter = load_file(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(v.abs().sum() > 0 for name, v in adapter.items() if "lora_B" in name)  # B starts at 0: it trained
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = weights(tmp_path / "lora")
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # only LoRA-targeted weights moved


def test_bad_inputs_are_clear(tmp_path, tiny_model_dir, reference_dir, pairs_dir):
    import pandas as pd

    empty = tmp_path / "empty"
    empty.mkdir()
    pd.DataFrame(columns=["prompt", "chosen", "rejected"]).to_parquet(empty / "train.parquet")
    vouch(empty)
    with pytest.raises(ValueError, match="no preference pairs"):
        run_dpo(_cfg(), empty, tiny_model_dir, tmp_path / "o")
    with pytest.raises(ValueError, match="loss_type"):
        DpoConfig(loss_type="dpo2")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run_dpo(_cfg(per_device_batch_size=32), pairs_dir, tiny_model_dir, tmp_path / "o2", reference_dir=reference_dir)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_accelerate_recipes_are_valid_accelerate_configs(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}[name]
    assert config.mixed_precision == "bf16"


def test_logged_metrics_average_the_logging_window(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    run_dpo(_cfg(max_steps=4), pairs_dir, tiny_model_dir, tmp_path / "every", reference_dir=reference_dir)
    run_dpo(_cfg(max_steps=4, log_every=2), pairs_dir, tiny_model_dir, tmp_path / "window", reference_dir=reference_dir)
    every, window = _metrics(tmp_path / "every"), _metrics(tmp_path / "window")
    assert [m["step"] for m in window] == [2, 4]
    for logged, (a, b) in zip(window, [(every[0], every[1]), (every[2], every[3])]):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert logged[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-6, abs=1e-6)  # fp32 means
        assert logged["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)  # the last step's, as TRL


def test_bf16_mixed_precision_path_runs_on_cpu(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    """The GPU default (bf16 autocast, fp32 log-softmax) exercised on CPU: step 1 is still ln 2
    within bf16 resolution, and training still moves the margin."""
    run_dpo(_cfg(max_steps=3, precision="bf16"), pairs_dir, tiny_model_dir, tmp_path, reference_dir=reference_dir)
    metrics = _metrics(tmp_path)
    assert abs(metrics[0]["loss"] - math.log(2)) < 0.02
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[-1]["rewards/margins"] > 0
    assert weights(tmp_path)["model.embed_tokens.weight"].dtype == torch.float32  # master weights stay fp32


def test_reference_cache_needs_localweights(tmp_path, pairs_dir):
    with pytest.raises(ReferenceCacheError, match="not a local folder with \\*.safetensors weights"):
        run_reference(pairs_dir, tmp_path / "nowhere", tmp_path / "out", max_length=64)
