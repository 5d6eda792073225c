"""Preference pairs as token ids: a frame of (prompt, chosen, rejected) tokenized and truncated the
way TRL 1.x does it, and the concatenated batch layout (the shared-prefix layout the engine uses by
default is in lm/logprobs.py, next to the scorer that reads it; both are documented there)."""

from __future__ import annotations

import torch

from dpoflow.lm.logprobs import IGNORE, TokenizedPairs, encode_completions, pad_right


class TruncationError(ValueError):
    """A pair that cannot be trained on at the configured max_length."""


def tokenize_pairs(frame, tokenizer, max_length: int, truncation: str = "keep_start") -> TokenizedPairs:
    """Tokenize a preference frame (columns prompt, chosen, rejected[, prompt_messages]).

    truncation="keep_start" cuts each prompt+completion to max_length from the end; a prompt that
    alone fills max_length keeps only its last max_length // 2 tokens (the turns nearest the answer),
    so the completions keep the other half; both are counted in `truncated`, never an abort.
    "error" refuses any pair longer than max_length, quoting the start of its prompt.
    """
    prompts, chosen, rejected, truncated = [], [], [], 0
    messages = frame["prompt_messages"] if "prompt_messages" in frame else [""] * len(frame)
    for prompt, chosen_text, rejected_text, prompt_messages in zip(frame["prompt"], frame["chosen"], frame["rejected"],
                                                                   messages):
        prompt_ids, (chosen_ids, rejected_ids) = encode_completions(tokenizer, prompt, prompt_messages,
                                                                    [chosen_text, rejected_text])
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if longest > max_length:
            if truncation == "error":
                raise TruncationError(
                    f"the pair with prompt {prompt[:60]!r}... is {longest} tokens > max_length={max_length}; raise "
                    "dpo.max_length, set dpo.truncation=keep_start or drop long prompts with data.max_prompt_tokens"
                )
            truncated += 1
            if len(prompt_ids) >= max_length:
                prompt_ids = prompt_ids[len(prompt_ids) - max_length // 2:]
            room = max_length - len(prompt_ids)
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        prompts.append(prompt_ids)
        chosen.append(chosen_ids)
        rejected.append(rejected_ids)
    return TokenizedPairs(prompts, chosen, rejected, truncated)


def collate_pairs(pairs: TokenizedPairs, indices, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenated layout: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], right-padded."""
    sequences, labels = [], []
    for completions in (pairs.chosen_ids, pairs.rejected_ids):
        for i in indices:
            prompt = pairs.prompt_ids[i]
            sequences.append(prompt + completions[i])
            labels.append([IGNORE] * len(prompt) + completions[i])
    return pad_right(sequences, labels, pad_token_id)
