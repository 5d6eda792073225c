"""Judges score completions: `score(prompts, completions) -> list[float]` and pairwise `compare`.

    callable:<module>:<function>   a python function f(prompt, completion) -> float (the demo: VADER)
    reward_model:<path or models:/ URI>   AutoModelForSequenceClassification, score = logit 0
"""

from __future__ import annotations

import importlib


class Judge:
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        raise NotImplementedError

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        """Per item: 1.0 if a wins, 0.0 if b wins, 0.5 for a tie."""
        score_a, score_b = self.score(prompts, a), self.score(prompts, b)
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(score_a, score_b)]


class CallableJudge(Judge):
    def __init__(self, target: str):
        module, _, name = target.partition(":")
        if not name:
            raise ValueError(f"judge callable {target!r} must be 'package.module:function'")
        try:
            self.function = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import judge callable {target!r}: {error}") from error
        self.name = target

    def score(self, prompts, completions):
        return [float(self.function(p, c)) for p, c in zip(prompts, completions)]


class RewardModelJudge(Judge):
    def __init__(self, uri: str, batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpoflow.modeling import resolve_model_path

        path = resolve_model_path(uri)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        self.batch_size, self.torch, self.name = batch_size, torch, f"reward_model:{uri}"

    def score(self, prompts, completions):
        scores = []
        with self.torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                texts = [p + c for p, c in zip(prompts[start:start + self.batch_size],
                                               completions[start:start + self.batch_size])]
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def vader_sentiment(prompt: str, completion: str) -> float:
    """The demo's ground-truth reward: VADER compound sentiment of the full review, in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    global _VADER
    try:
        analyzer = _VADER
    except NameError:
        analyzer = _VADER = SentimentIntensityAnalyzer()
    return analyzer.polarity_scores(prompt + completion)["compound"]


def load_judge(spec: str) -> Judge:
    kind, _, target = spec.partition(":")
    if kind == "callable":
        return CallableJudge(target)
    if kind == "reward_model":
        return RewardModelJudge(target)
    raise ValueError(f"unknown judge {spec!r}; use 'callable:<module>:<function>' or 'reward_model:<path|models:/...>'")
