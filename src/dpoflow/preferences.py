"""`dpoflow prefs`: preference pairs by sampling the reference and scoring with a judge.

The DPO paper's IMDb protocol (Rafailov et al. 2023, sec. 6.1): for each prompt sample k completions
from the SFT model, score each with the judge, and keep (best, worst) as (chosen, rejected) when
their score gap is at least `min_gap`. Deterministic given the seed.

Outputs: train.parquet / eval.parquet (prompt, chosen, rejected, prompt_messages, chosen_score,
rejected_score), stats.json (prompts, pairs kept, dropped per reason, timings).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from dpoflow.config import PrefsConfig
from dpoflow.manifest import building
from dpoflow.meter import Meter


def build_pairs(prompts: list[str], samples: list[list[str]], scores: list[list[float]], min_gap: float):
    pairs, dropped = [], Counter()
    for prompt, completions, values in zip(prompts, samples, scores):
        order = sorted(range(len(completions)), key=lambda i: values[i])
        worst, best = order[0], order[-1]
        if completions[best] == completions[worst]:
            dropped["identical_samples"] += 1
        elif not completions[best].strip() or not completions[worst].strip():
            dropped["empty_sample"] += 1
        elif values[best] - values[worst] < min_gap:
            dropped["gap_below_min_gap"] += 1
        else:
            pairs.append({"prompt": prompt, "chosen": completions[best], "rejected": completions[worst],
                          "prompt_messages": "", "chosen_score": values[best], "rejected_score": values[worst]})
    return pairs, dropped


def run_prefs(cfg: PrefsConfig, data_dir, model_dir, out_dir, shard: tuple[int, int] = (0, 1), sampler: str = "",
              log=print) -> dict:
    """`model_dir` samples the completions: the reference, or (on-policy rounds) the current policy;
    `sampler` names a policy that is not the reference (recorded in stats.json). `shard` = (i, n):
    this round trains on every n-th training prompt from the i-th (the eval prompts are the same
    every round)."""
    with building("prefs", out_dir, config=[cfg, list(shard), sampler], inputs={"data": data_dir, "model": model_dir},
                  verify_inputs={"model": False}) as (work, _):
        return _run_prefs(cfg, data_dir, model_dir, work, shard, sampler, log)


def _run_prefs(cfg: PrefsConfig, data_dir, model_dir, out_dir, shard: tuple[int, int], sampler: str, log) -> dict:
    import pandas as pd
    import torch

    from dpoflow.evaluation.judges import load_judge
    from dpoflow.generation import sample_completions
    from dpoflow.modeling import load_model, load_tokenizer

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    if torch.cuda.is_available():
        model = model.to("cuda")
    judge = load_judge(cfg.judge)
    from dpoflow.evaluation.stats import diversity

    stats: dict = {"judge": cfg.judge, "k": cfg.k, "min_gap": cfg.min_gap}
    if shard != (0, 1):
        stats["shard"] = list(shard)
    if sampler:
        stats["sampler"] = sampler
    started = time.perf_counter()
    for split, limit in (("train", cfg.max_prompts), ("eval", cfg.max_eval_prompts)):
        frame = pd.read_parquet(data_dir / f"prompts_{split}.parquet").head(limit)
        if split == "train":
            frame = frame.iloc[shard[0]::shard[1]]
        prompts = frame.prompt.tolist()
        samples = sample_completions(model, tokenizer, prompts, num_samples=cfg.k, temperature=cfg.temperature,
                                     top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                                     seed=cfg.seed + (split == "eval"), prompt_messages=frame.prompt_messages.tolist(),
                                     what=f"sample ({split})")
        scores = []
        with Meter(f"judge ({split})", len(prompts), "prompts", log=log) as meter:
            for prompt, completions in zip(prompts, samples):
                scores.append(judge.score([prompt] * len(completions), completions))
                meter.advance()
        pairs, dropped = build_pairs(prompts, samples, scores, cfg.min_gap)
        pd.DataFrame(pairs, columns=["prompt", "chosen", "rejected", "prompt_messages", "chosen_score",
                                     "rejected_score"]).to_parquet(out_dir / f"{split}.parquet", index=False)
        stats[split] = {"prompts": len(prompts), "pairs": len(pairs), "dropped": dict(dropped),
                        "samples": {k: round(v, 6) for k, v in diversity([t for s in samples for t in s]).items()},
                        "mean_score": round(sum(map(sum, scores)) / max(1, sum(map(len, scores))), 6)}
        log(f"prefs: {split}: {len(prompts)} prompts -> {len(pairs)} pairs (dropped {dict(dropped) or 'none'})")
    seconds = round(time.perf_counter() - started, 2)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")  # deterministic: DVC-friendly
    (out_dir / "timing.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    return {**stats, "seconds": seconds}
