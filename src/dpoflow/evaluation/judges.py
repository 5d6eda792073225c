"""Judges score completions: `score(prompts, completions) -> list[float]` and pairwise `compare`.

    callable:<module>:<function>   a python function f(prompt, completion) -> float (the demo: VADER)
    reward_model:<path or models:/ URI>   AutoModelForSequenceClassification, score = logit 0
    llm                            an OpenAI-compatible chat-completions judge (pairwise only),
                                   configured by eval.llm_judge
"""

from __future__ import annotations

import importlib
import json
import os
import random
import time
import urllib.request
from functools import lru_cache

from dpoflow.config import LLMJudgeConfig


class JudgeError(RuntimeError):
    """A judge failed on an item; the message names the judge, the item and the fix."""


class Judge:
    pairwise_only = False

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
        scores = []
        for item, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                value = float(self.function(prompt, completion))
            except Exception as error:
                raise JudgeError(f"judge callable:{self.name} raised {type(error).__name__}: {error} on item {item} (prompt "
                                 f"{prompt[:60]!r}, completion {completion[:60]!r}); nothing was judged or trained "
                                 "on past it — fix the judge (it must return a number for any text) and start "
                                 "again: finished steps are reused") from error
            if value != value or value in (float("inf"), float("-inf")):
                raise JudgeError(f"judge callable:{self.name} returned {value} on item {item} (prompt {prompt[:60]!r}): a "
                                 "judge must return a finite number")
            scores.append(value)
        return scores


class RewardModelJudge(Judge):
    def __init__(self, uri: str, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpoflow.modeling import resolve_model_path

        path = resolve_model_path(uri)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        self.batch_size, self.name = batch_size, f"reward_model:{uri}"

    def score(self, prompts, completions):
        import torch

        scores = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                texts = [p + c for p, c in zip(prompts[start:start + self.batch_size],
                                               completions[start:start + self.batch_size])]
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompt: str, completion: str) -> float:
    """The demo's ground-truth reward: VADER compound sentiment of the full review, in [-1, 1]."""
    return _vader().polarity_scores(prompt + completion)["compound"]


DEMO_JUDGE = "callable:dpoflow.evaluation.judges:vader_sentiment"


def load_judge(spec: str, llm: LLMJudgeConfig | None = None) -> Judge:
    """`spec` names the judge; `llm` (an LLMJudgeConfig) configures the 'llm' judge."""
    if spec == "demo":  # the demo's ground truth; config checks keep it to the demo's data
        spec = DEMO_JUDGE
    kind, _, target = spec.partition(":")
    if kind == "llm":
        if llm is None or not llm.base_url or not llm.model:
            raise ValueError("judge 'llm' needs eval.llm_judge.base_url and eval.llm_judge.model")
        return LLMJudge(llm.base_url, llm.model, llm.api_key_env, llm.template, llm.max_retries, llm.backoff_s,
                        llm.timeout_s, llm.seed)
    if kind == "callable":
        return CallableJudge(target)
    if kind == "reward_model":
        return RewardModelJudge(target)
    raise ValueError(f"unknown judge {spec!r}; use 'callable:<module>:<function>', "
                     "'reward_model:<path|models:/...>' or 'llm'")


DEFAULT_LLM_TEMPLATE = LLMJudgeConfig.model_fields["template"].default


class LLMJudge(Judge):
    """Pairwise judge over any OpenAI-compatible chat-completions endpoint.

    Per item the order of the two completions is randomised (seeded) and recorded, so position bias
    cancels out on average and can be audited. A request is retried with exponential backoff; an
    item that still fails, or whose answer is neither '1' nor '2', is a failure: its verdict is None,
    it is counted and reported, and it never counts as a win.
    """

    pairwise_only = True

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 template: str = DEFAULT_LLM_TEMPLATE, max_retries: int = 3, backoff_s: float = 1.0,
                 timeout_s: float = 60.0, seed: int = 0, sleep=None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.template, self.max_retries = model, template, max_retries
        self.backoff_s, self.timeout_s, self.seed = backoff_s, timeout_s, seed
        self.api_key = os.environ.get(api_key_env, "")
        self.sleep = sleep or time.sleep
        self.name = f"llm:{model}"
        self.last_orders: list[str] = []
        self.last_failures: list[str] = []

    def score(self, prompts, completions):
        raise TypeError("the LLM judge is pairwise: use compare(prompts, a, b)")

    def _ask(self, content: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": content}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"].strip()

    def compare(self, prompts, a, b):
        rng = random.Random(self.seed)
        verdicts, self.last_orders, self.last_failures = [], [], []
        for prompt, first_a, first_b in zip(prompts, a, b):
            swapped = rng.random() < 0.5
            first, second = (first_b, first_a) if swapped else (first_a, first_b)
            self.last_orders.append("BA" if swapped else "AB")
            answer, error = None, ""
            for attempt in range(self.max_retries + 1):
                try:
                    answer = self._ask(self.template.format(prompt=prompt, first=first, second=second))
                    break
                except Exception as failure:  # HTTP error, timeout, malformed response
                    error = f"{type(failure).__name__}: {failure}"
                    if attempt < self.max_retries:
                        self.sleep(self.backoff_s * 2 ** attempt)
            choice = answer[:1] if answer else ""
            if choice not in ("1", "2"):
                verdicts.append(None)
                self.last_failures.append(error or f"unparseable answer {answer!r}")
                continue
            self.last_failures.append("")
            first_wins = choice == "1"
            verdicts.append(1.0 if first_wins != swapped else 0.0)
        return verdicts
