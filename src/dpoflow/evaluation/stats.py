"""Interval math for evaluation: Wilson score interval for a win rate (ties count ½), bootstrap for means."""

from __future__ import annotations

import math
import random


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (Wilson 1927); `successes` may be fractional (ties ½)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at p = 0 or 1 one bound is exactly 0 or 1 (centre ± half cancel); float rounding must not move it
    # inside the observed rate (0.9999999999999999 < 1 gave the report a negative error bar)
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def bootstrap_mean_interval(values: list[float], seed: int = 0, rounds: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of a mean."""
    if not values:
        return 0.0, 0.0
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def win_rate_summary(verdicts: list[float]) -> dict:
    """Verdicts 1 / ½ / 0 per item -> win rate (ties ½), its Wilson interval and the counts."""
    n = len(verdicts)
    wins, ties = sum(v == 1.0 for v in verdicts), sum(v == 0.5 for v in verdicts)
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return {"win_rate": (wins + 0.5 * ties) / n if n else 0.0, "win_rate_ci_low": low, "win_rate_ci_high": high,
            "wins": wins, "ties": ties, "losses": n - wins - ties, "n_prompts": n}


def reward_margin_summary(policy_scores: list[float], reference_scores: list[float], seed: int = 0) -> dict:
    margins = [a - b for a, b in zip(policy_scores, reference_scores)]
    n = max(len(margins), 1)
    low, high = bootstrap_mean_interval(margins, seed)
    return {"reward_policy": sum(policy_scores) / n, "reward_reference": sum(reference_scores) / n,
            "reward_margin": sum(margins) / n, "reward_margin_ci_low": low, "reward_margin_ci_high": high}


def diversity(texts: list[str]) -> dict:
    """How varied a set of completions is (words = whitespace tokens, lower-cased):
    distinct_n = unique n-grams / all n-grams over the whole set (Li et al. 2016), for n = 1, 2;
    repetition = mean over completions of the share of their bigrams that repeat an earlier bigram of
    the same completion. A policy that exploits its judge collapses onto a few phrases: distinct-n
    falls and repetition rises while the judge's reward still climbs."""
    words = [text.lower().split() for text in texts]
    result = {}
    for n in (1, 2):
        grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
        result[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    repeats = []
    for w in words:
        bigrams = [tuple(w[i:i + 2]) for i in range(len(w) - 1)]
        if bigrams:
            repeats.append(1 - len(set(bigrams)) / len(bigrams))
    result["repetition"] = sum(repeats) / len(repeats) if repeats else 0.0
    return result
