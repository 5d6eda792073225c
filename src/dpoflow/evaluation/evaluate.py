"""`dpoflow eval`: the policy against the reference on held-out prompts.

Both models sample with identical settings and seeds; the judge scores both completions; metrics:
    win_rate (ties ½) + 95 % Wilson interval, wins/ties/losses
    judge reward of each, margin (policy − reference) + bootstrap interval
    implicit-reward accuracy and margin on held-out preference pairs (β·log-ratios, as in training)
    kl: KL(π‖π_ref) estimated on the policy's own samples (temperature 1, full nucleus) = mean over
        samples of Σ_t [log π(y_t|·) − log π_ref(y_t|·)], an unbiased Monte-Carlo estimate of the
        sequence KL, on the sampled token ids
    mean completion lengths (tokens) of both, and win rate per policy-length bucket (length bias)
Writes metrics.json, samples.parquet (both completions, scores, verdict, judge A/B order and
failure per item, and each KL sample's token ids and log-ratio) and a self-contained report.html.
Win rate and reward margin are computed by the HF `evaluate` modules in evaluation/metrics (one
implementation of the math).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpoflow.config import EvalConfig
from dpoflow.evaluation.metrics import load_metric


def run_eval(cfg: EvalConfig, policy_dir, reference_model_dir, data_dir, out_dir, *, beta: float, pairs_dir=None,
             max_length: int = 128, training_metrics=None, extra_metrics: dict | None = None, log=print) -> dict:
    """`training_metrics`: the DPO run's metrics.jsonl, plotted in the report when given;
    `extra_metrics` (e.g. the on-policy round) go into metrics.json. Built atomically (manifest.py)."""
    from dpoflow.manifest import building

    inputs = {"policy": policy_dir, "reference_model": reference_model_dir, "data": data_dir, "pairs": pairs_dir}
    with building("eval", out_dir, config=[cfg, beta, max_length, extra_metrics or {}], inputs=inputs,
                  verify_inputs={"policy": False, "reference_model": False}) as (work, _):
        return _run_eval(cfg, policy_dir, reference_model_dir, data_dir, work, beta=beta, pairs_dir=pairs_dir,
                         max_length=max_length, training_metrics=training_metrics, extra_metrics=extra_metrics or {},
                         log=log)


def _run_eval(cfg: EvalConfig, policy_dir, reference_model_dir, data_dir, out_dir, *, beta: float, pairs_dir,
              max_length: int, training_metrics, extra_metrics: dict, log) -> dict:
    import pandas as pd

    from dpoflow.evaluation.report import write_report
    from dpoflow.evaluation.stats import diversity
    from dpoflow.generation import generate_ids
    from dpoflow.lm.logprobs import score_sequences, tokenize_prompt
    from dpoflow.modeling import load_model, load_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_frame = pd.read_parquet(Path(data_dir) / "prompts_eval.parquet").head(cfg.max_prompts)
    prompts = prompts_frame.prompt.tolist()
    if not prompts:
        raise ValueError(f"{Path(data_dir) / 'prompts_eval.parquet'} holds no held-out prompts, so there is nothing to "
                         "evaluate on: raise data.eval_fraction (the split is by a hash of each prompt, so a handful "
                         "of rows may hold out none) or bring more data")
    tokenizer = load_tokenizer(str(reference_model_dir))
    policy, reference = load_model(str(policy_dir)), load_model(str(reference_model_dir))
    prompt_ids = [tokenize_prompt(tokenizer, p, m) for p, m in zip(prompts, prompts_frame.prompt_messages)]
    duel = judge_pair(cfg, policy, reference, tokenizer, prompts, prompt_ids)
    policy_ids, reference_ids = duel["a_ids"], duel["b_ids"]
    policy_text, reference_text = duel["a_text"], duel["b_text"]
    policy_scores, reference_scores, verdicts = duel["a_scores"], duel["b_scores"], duel["verdicts"]
    orders, failures = duel["orders"], duel["failures"]
    metrics: dict = {"beta": beta, **extra_metrics, "judge": cfg.judge,
                     "eval_set_hash": eval_set_hash(cfg, prompts, Path(reference_model_dir))}
    if policy_scores[0] is not None:
        metrics.update(load_metric("reward_margin").compute(policy_scores=policy_scores,
                                                            reference_scores=reference_scores, seed=cfg.seed))
    judged = [v for v in verdicts if v is not None]  # a failed judgement is never a win
    metrics.update(load_metric("win_rate").compute(verdicts=judged))
    metrics["judge_failures"] = len(verdicts) - len(judged)
    width = metrics["win_rate_ci_high"] - metrics["win_rate_ci_low"]
    if width > 0.2:  # e.g. 24 prompts: ±0.2; the figure then says little
        log(f"eval: WARNING: only {len(judged)} judged prompts: the win rate's 95 % interval is {width:.2f} wide; "
            "hold out more prompts (data.eval_fraction, eval.max_prompts) before trusting or gating on it")

    # KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)], estimated on samples of π itself: temperature 1
    # and no nucleus cut (samples at the judging temperature come from another distribution), scored
    # on the exact sampled token ids
    kl_ids = policy_ids
    if (cfg.temperature, cfg.top_p, cfg.top_k) != (1.0, 1.0, 0):
        kl_ids = [s[0] for s in generate_ids(policy, tokenizer, prompt_ids, **{**sampling(cfg), "temperature": 1.0,
                                                                              "top_p": 1.0, "top_k": 0,
                                                                              "seed": cfg.seed + 1},
                                                        what="sample for KL")]
    policy_logps, _ = score_sequences(policy, prompt_ids, kl_ids, tokenizer.pad_token_id)
    reference_logps, _ = score_sequences(reference, prompt_ids, kl_ids, tokenizer.pad_token_id)
    kl_per_sample = (policy_logps - reference_logps).tolist()
    policy_lengths = torch.tensor([len(ids) for ids in policy_ids], dtype=torch.float)
    reference_lengths = torch.tensor([len(ids) for ids in reference_ids], dtype=torch.float)
    metrics["kl"] = sum(kl_per_sample) / len(kl_per_sample)
    # next to the reward: does the policy still write varied text? (a judge-exploitation guard)
    for who, texts in (("policy", policy_text), ("reference", reference_text)):
        metrics.update({f"{name}_{who}": value for name, value in diversity(texts).items()})
    if metrics["distinct_2_reference"]:
        metrics["diversity_ratio"] = metrics["distinct_2_policy"] / metrics["distinct_2_reference"]
    metrics["length_policy"] = float(policy_lengths.mean())
    metrics["length_reference"] = float(reference_lengths.mean())
    median = float(policy_lengths.median())
    for name, chosen in (("short", policy_lengths <= median), ("long", policy_lengths > median)):
        bucket = [v for v, keep in zip(verdicts, chosen.tolist()) if keep and v is not None]
        metrics[f"win_rate_{name}_completions"] = sum(bucket) / len(bucket) if bucket else None

    if pairs_dir is not None and (Path(pairs_dir) / "eval.parquet").exists():
        from dpoflow.dpo.losses import preference_loss
        from dpoflow.dpo.reference import compute_logps

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
                            "kl_sample_logratio": kl_per_sample,
                            # the exact ids KL was scored on: anyone can recompute it from this file
                            "kl_completion_ids": [[int(t) for t in ids] for ids in kl_ids]})
    samples.to_parquet(out_dir / "samples.parquet", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out_dir / "report.html", metrics, samples, training_metrics)
    margin = f", reward margin {metrics['reward_margin']:+.3f}" if "reward_margin" in metrics else ""
    log(f"eval: win rate {metrics['win_rate']:.3f} [{metrics['win_rate_ci_low']:.3f}, {metrics['win_rate_ci_high']:.3f}] "
        f"on {metrics['n_prompts']} prompts{margin}, KL {metrics['kl']:.2f}, judge failures {metrics['judge_failures']}")
    return metrics


def eval_set_hash(cfg: EvalConfig, prompts: list[str], reference_model_dir: Path) -> str:
    """What makes two evaluations' win rates comparable: the same prompts, judge, sampling settings
    and reference weights. The registry's gate compares figures only under the same hash."""
    import hashlib

    from dpoflow.manifest import files_digest

    settings = [prompts, cfg.judge, cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.seed,
                files_digest(Path(reference_model_dir).glob("*.safetensors"), names=True)]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def sampling(cfg: EvalConfig) -> dict:
    """The generation settings both models are sampled with (the same seed for both)."""
    return dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed)


def judge_pair(cfg: EvalConfig, model_a, model_b, tokenizer, prompts: list[str], prompt_ids,
               names: tuple[str, str] = ("policy", "reference")) -> dict:
    """Sample both models with identical settings and seeds and let the judge decide each prompt:
    verdict 1 = a better, 0.5 tie, 0 = b better, None = the judge failed (never a win)."""
    from dpoflow.evaluation.judges import load_judge
    from dpoflow.generation import generate_ids

    a_ids = [s[0] for s in generate_ids(model_a, tokenizer, prompt_ids, **sampling(cfg), what=f"generate ({names[0]})")]
    b_ids = [s[0] for s in generate_ids(model_b, tokenizer, prompt_ids, **sampling(cfg), what=f"generate ({names[1]})")]
    a_text = tokenizer.batch_decode(a_ids, skip_special_tokens=True)
    b_text = tokenizer.batch_decode(b_ids, skip_special_tokens=True)
    judge = load_judge(cfg.judge, cfg.llm_judge)
    if judge.pairwise_only:
        a_scores = b_scores = [None] * len(prompts)
        verdicts = judge.compare(prompts, a_text, b_text)
        orders, failures = judge.last_orders, judge.last_failures
    else:
        a_scores, b_scores = judge.score(prompts, a_text), judge.score(prompts, b_text)
        verdicts = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(a_scores, b_scores)]
        orders, failures = ["AB"] * len(prompts), [""] * len(prompts)
    return {"a_ids": a_ids, "b_ids": b_ids, "a_text": a_text, "b_text": b_text, "a_scores": a_scores,
            "b_scores": b_scores, "verdicts": verdicts, "orders": orders, "failures": failures}


def head_to_head(cfg: EvalConfig, challenger_dir, champion_dir, data_dir, log=print) -> dict:
    """Win rate of the challenger against the champion on this run's held-out prompts (ties ½, 95 %
    Wilson interval): the registry gate's comparison when the champion was evaluated on another set."""
    import pandas as pd

    from dpoflow.lm.logprobs import tokenize_prompt
    from dpoflow.modeling import load_model, load_tokenizer

    frame = pd.read_parquet(Path(data_dir) / "prompts_eval.parquet").head(cfg.max_prompts)
    prompts = frame.prompt.tolist()
    tokenizer = load_tokenizer(str(challenger_dir))
    prompt_ids = [tokenize_prompt(tokenizer, p, m) for p, m in zip(prompts, frame.prompt_messages)]
    duel = judge_pair(cfg, load_model(str(challenger_dir)), load_model(str(champion_dir)), tokenizer, prompts, prompt_ids,
                      ("challenger", "champion"))
    metrics = load_metric("win_rate").compute(verdicts=[v for v in duel["verdicts"] if v is not None])
    log(f"head to head: challenger wins {metrics['win_rate']:.3f} [{metrics['win_rate_ci_low']:.3f}, "
        f"{metrics['win_rate_ci_high']:.3f}] against the champion on {len(prompts)} prompts")
    return metrics
