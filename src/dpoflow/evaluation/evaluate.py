"""`dpoflow eval`: the policy against the reference on held-out prompts.

Both models sample with identical settings and seeds; the judge scores both completions; metrics:
    win_rate (ties ½) + 95 % Wilson interval, wins/ties/losses
    judge reward of each, margin (policy − reference) + bootstrap interval
    implicit-reward accuracy and margin on held-out preference pairs (β·log-ratios, as in training)
    kl: KL(π‖π_ref) estimated on the policy's own samples = mean over samples of
        Σ_t [log π(y_t|·) − log π_ref(y_t|·)]   (an unbiased Monte-Carlo estimate of the sequence KL)
    mean completion lengths (tokens) of both, and win rate per policy-length bucket (length bias)
Writes metrics.json, samples.parquet (both completions, scores, verdict, judge A/B order and
failure per item) and a self-contained report.html. Win rate and reward margin are computed by the
HF `evaluate` modules in evaluation/metrics (one implementation of the math).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpoflow.config import EvalConfig
from dpoflow.evaluation.metrics import load_metric


def _completion_logps(model, tokenizer, prompts, policy_text, reference_text, max_length: int):
    """log π(completion|prompt) of `model` for the policy's and the reference's completions, plus their
    token counts: one pass with the two completions laid out as a (chosen, rejected) pair."""
    import pandas as pd

    from dpoflow.dpo.reference import compute_logps

    frame = pd.DataFrame({"prompt": prompts, "chosen": policy_text, "rejected": reference_text})
    values, _ = compute_logps(model, tokenizer, frame, max_length, "keep_start")
    return values[:, 0], values[:, 1], values[:, 2], values[:, 3]


def run_eval(cfg: EvalConfig, policy_dir, reference_model_dir, data_dir, out_dir, *, beta: float, pairs_dir=None,
             max_length: int = 128, training_metrics=None, log=print) -> dict:
    """`training_metrics`: the DPO run's metrics.jsonl, plotted in the report when given."""
    import pandas as pd

    from dpoflow.evaluation.judges import load_judge
    from dpoflow.evaluation.report import write_report
    from dpoflow.modeling import load_model, load_tokenizer, sample_completions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_frame = pd.read_parquet(Path(data_dir) / "prompts_eval.parquet").head(cfg.max_prompts)
    prompts = prompts_frame.prompt.tolist()
    tokenizer = load_tokenizer(str(reference_model_dir))
    policy, reference = load_model(str(policy_dir)), load_model(str(reference_model_dir))
    settings = dict(num_samples=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                    seed=cfg.seed, prompt_messages=prompts_frame.prompt_messages.tolist())
    policy_text = [s[0] for s in sample_completions(policy, tokenizer, prompts, **settings)]
    reference_text = [s[0] for s in sample_completions(reference, tokenizer, prompts, **settings)]
    judge = load_judge(cfg.judge, cfg.llm_judge)
    metrics: dict = {"beta": beta, "judge": cfg.judge}
    if judge.pairwise_only:
        policy_scores = reference_scores = [None] * len(prompts)
        verdicts = judge.compare(prompts, policy_text, reference_text)
        orders, failures = judge.last_orders, judge.last_failures
    else:
        policy_scores, reference_scores = judge.score(prompts, policy_text), judge.score(prompts, reference_text)
        verdicts = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(policy_scores, reference_scores)]
        orders, failures = ["AB"] * len(prompts), [""] * len(prompts)
        metrics.update(load_metric("reward_margin").compute(policy_scores=policy_scores,
                                                            reference_scores=reference_scores, seed=cfg.seed))
    judged = [v for v in verdicts if v is not None]  # a failed judgement is never a win
    metrics.update(load_metric("win_rate").compute(verdicts=judged))
    metrics["judge_failures"] = len(verdicts) - len(judged)

    # KL(π‖π_ref) on the policy's samples (re-tokenized from text: a sampled non-canonical BPE split
    # is scored as its canonical one)
    policy_logps, _, policy_lengths, reference_lengths = _completion_logps(
        policy, tokenizer, prompts, policy_text, reference_text, max_length)
    reference_on_policy, *_ = _completion_logps(reference, tokenizer, prompts, policy_text, reference_text, max_length)
    kl_per_sample = (policy_logps - reference_on_policy).tolist()
    metrics["kl"] = sum(kl_per_sample) / len(kl_per_sample)
    metrics["length_policy"] = float(policy_lengths.mean())
    metrics["length_reference"] = float(reference_lengths.mean())
    median = float(policy_lengths.median())
    for name, chosen in (("short", policy_lengths <= median), ("long", policy_lengths > median)):
        bucket = [v for v, keep in zip(verdicts, chosen.tolist()) if keep and v is not None]
        metrics[f"win_rate_{name}_completions"] = sum(bucket) / len(bucket) if bucket else None

    if pairs_dir is not None and (Path(pairs_dir) / "eval.parquet").exists():
        from dpoflow.dpo.reference import compute_logps
        from dpoflow.dpo.losses import preference_loss

        pairs = pd.read_parquet(Path(pairs_dir) / "eval.parquet")
        if len(pairs):
            p, _ = compute_logps(policy, tokenizer, pairs, max_length, "keep_start")
            r, _ = compute_logps(reference, tokenizer, pairs, max_length, "keep_start")
            _, chosen, rejected = preference_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], beta=beta)
            metrics["implicit_accuracy"] = float((chosen > rejected).double().mean())
            metrics["implicit_margin"] = float((chosen - rejected).mean())
            metrics["n_eval_pairs"] = len(pairs)

    samples = pd.DataFrame({"prompt": prompts, "policy": policy_text, "reference": reference_text,
                            "policy_score": policy_scores, "reference_score": reference_scores, "verdict": verdicts,
                            "judge_order": orders, "judge_failure": failures,
                            "policy_length": policy_lengths.tolist(), "reference_length": reference_lengths.tolist(),
                            "policy_minus_reference_logp": kl_per_sample})
    samples.to_parquet(out_dir / "samples.parquet", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out_dir / "report.html", metrics, samples, training_metrics)
    margin = f", reward margin {metrics['reward_margin']:+.3f}" if "reward_margin" in metrics else ""
    log(f"eval: win rate {metrics['win_rate']:.3f} [{metrics['win_rate_ci_low']:.3f}, {metrics['win_rate_ci_high']:.3f}] "
        f"on {metrics['n_prompts']} prompts{margin}, KL {metrics['kl']:.2f}, judge failures {metrics['judge_failures']}")
    return metrics
