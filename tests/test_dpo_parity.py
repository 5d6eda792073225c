"""Parity with TRL's DPOTrainer (the peer users compare us with): same tiny model, same 16 pairs,
policy != reference so the numbers are not trivially ln 2. Our log-probs + losses must reproduce
TRL's logged first-step loss and rewards within 1e-4 for each loss type."""

import copy
import json

import pytest
import trl

from conftest import make_pairs
from dpoflow.dpo.losses import preference_loss, sft_loss
from dpoflow.dpo.reference import compute_logps
from dpoflow.modeling import build_model, load_tokenizer


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return tokenizer, build_model(tokenizer, "tiny", seed=0), build_model(tokenizer, "tiny", seed=1)


def _mid_word_pairs():
    """Prompts that stop inside a word: the completion's first token merges across the boundary."""
    pairs = make_pairs(16, seed=5)
    pairs["prompt"] = pairs.prompt + " the superb"  # ... "the sup" | "erb great fun"
    pairs["chosen"] = "erb" + pairs.chosen
    pairs["rejected"] = "erb" + pairs.rejected
    pairs["prompt"] = pairs.prompt.str[:-3]
    return pairs


def _conversational_pairs():
    pairs = make_pairs(16, seed=7)
    return pairs.assign(prompt_messages=[json.dumps([{"role": "user", "content": p}]) for p in pairs.prompt])


def _trl_rows(pairs):
    if pairs.prompt_messages.iloc[0]:
        return [{"prompt": json.loads(m), "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}]}
                for m, c, r in zip(pairs.prompt_messages, pairs.chosen, pairs.rejected)]
    return pairs[["prompt", "chosen", "rejected"]].to_dict(orient="records")


def _equal_chosen_lengths(tokenizer, model):
    """16 pairs whose chosen completions have the same token count: there RPO's per-example NLL (ours)
    and TRL's `sft` term (NLL over all chosen tokens of the batch) are the same quantity."""
    pairs = make_pairs(200, seed=11)
    lengths = compute_logps(model.eval(), tokenizer, pairs, 128, "keep_start")[0][:, 2].int()
    common = int(lengths.mode().values)
    return pairs[(lengths == common).numpy()].head(16).reset_index(drop=True)


def _trl_first_step(tmp_path, models, pairs, loss_type: list[str], loss_weights=None, label_smoothing=0.0) -> dict:
    import datasets

    tokenizer, reference, policy = models
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(pairs), max_steps=1,
                         learning_rate=1e-3, beta=0.1, loss_type=loss_type, loss_weights=loss_weights,
                         label_smoothing=label_smoothing, logging_steps=1, report_to=[], use_cpu=True, max_length=128,
                         save_strategy="no", disable_tqdm=True, bf16=False,
                         gradient_checkpointing=False)  # TRL's defaults are bf16 + checkpointing
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_list(_trl_rows(pairs)),
                             processing_class=tokenizer)
    trainer.train()
    return trainer.state.log_history[0]


@pytest.mark.parametrize("loss_type,label_smoothing,data", [
    ("sigmoid", 0.0, "standard"), ("ipo", 0.0, "standard"), ("hinge", 0.0, "standard"), ("robust", 0.1, "standard"),
    ("cdpo", 0.1, "standard"), ("rpo", 0.0, "equal_chosen"),
    ("sigmoid", 0.0, "mid_word"), ("sigmoid", 0.0, "conversational"),
])
def test_first_step_matches_trl(tmp_path, models, loss_type, label_smoothing, data):
    """cDPO: TRL 1.16's sigmoid loss ignores label smoothing, and cDPO = (1-ε)·sigmoid(h) + ε·sigmoid(-h),
    so it is TRL's sigmoid loss on the pairs and on the pairs swapped, weighted. RPO (dpo.rpo_alpha):
    TRL's loss list ["sigmoid", "sft"] weighted [1, alpha], on pairs whose chosen completions have
    equal lengths (TRL averages the NLL over the batch's tokens, we per example: equal there)."""
    tokenizer, reference, policy = models
    pairs = {"standard": lambda: make_pairs(16), "mid_word": _mid_word_pairs, "conversational": _conversational_pairs,
             "equal_chosen": lambda: _equal_chosen_lengths(tokenizer, reference)}[data]()
    rpo_alpha = 0.5 if loss_type == "rpo" else 0.0
    if loss_type == "cdpo":
        theirs = _trl_first_step(tmp_path / "straight", models, pairs, ["sigmoid"])
        swapped = pairs.rename(columns={"chosen": "rejected", "rejected": "chosen"})
        flipped = _trl_first_step(tmp_path / "swapped", models, swapped, ["sigmoid"])["loss"]
        theirs["loss"] = (1 - label_smoothing) * theirs["loss"] + label_smoothing * flipped
    elif loss_type == "rpo":
        theirs = _trl_first_step(tmp_path, models, pairs, ["sigmoid", "sft"], [1.0, rpo_alpha])
    else:
        theirs = _trl_first_step(tmp_path, models, pairs, [loss_type], label_smoothing=label_smoothing)

    policy_values = compute_logps(policy.eval(), tokenizer, pairs, 128, "keep_start")[0].float()
    reference_values = compute_logps(reference.eval(), tokenizer, pairs, 128, "keep_start")[0].float()
    losses, chosen, rejected = preference_loss(
        policy_values[:, 0], policy_values[:, 1], reference_values[:, 0], reference_values[:, 1], beta=0.1,
        loss_type="sigmoid" if loss_type == "rpo" else loss_type, label_smoothing=label_smoothing,
        chosen_lengths=policy_values[:, 2], rejected_lengths=policy_values[:, 3])
    if rpo_alpha:  # as dpo/train.py adds it
        assert len(pairs) == 16 and policy_values[:, 2].unique().numel() == 1
        losses = losses + rpo_alpha * sft_loss(policy_values[:, 0], policy_values[:, 2])
    # ipo's loss is ~24 here ((h - 1/(2β))² with 1/(2β) = 5): fp32 rounding of the two forwards (full
    # logits vs completion-only logits) shows in its 7th digit, so it is compared relative to its size
    tolerance = {"abs": 1e-4} if loss_type != "ipo" else {"rel": 1e-5}
    assert losses.mean().item() == pytest.approx(theirs["loss"], **tolerance)
    assert chosen.mean().item() == pytest.approx(theirs["rewards/chosen"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(theirs["rewards/rejected"], abs=1e-4)
    assert (policy_values[:, 0].mean().item()) == pytest.approx(theirs["logps/chosen"], abs=1e-3)
    assert abs(theirs["loss"] - 0.6931) > 1e-3  # a real comparison, not two copies of ln 2
