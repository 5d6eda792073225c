"""Sequence log-probs of completions, shared by SFT, generation, evaluation and DPO: tokenization,
batch layouts, and the forward that sums them (the output head in chunks: head.py; block attention:
blocks.py).

Tokenization (as TRL 1.x does for the same data): prompt tokens = the prompt text with the
tokenizer's special tokens (or the chat template of `prompt_messages` with the generation prompt);
each completion is tokenized jointly with the prompt and starts where the joint tokens leave the
prompt's, + EOS. A preference pair (dpo/pairs.py) is truncated `keep_start` to `max_length` over
prompt + completion.

Batch layout of `collate_pairs` (dpo/pairs.py; B pairs -> 2B rows, chosen rows first, then rejected, prompt masked):

    pairs: ("Hi", " yes"), ("Hi", " no")          tokens: Hi=5, yes=7, no=8, EOS=2, PAD=0
    input_ids      [[5, 7, 2],      # chosen_0
                    [5, 8, 2]]      # rejected_0
    labels         [[-100, 7, 2],
                    [-100, 8, 2]]   # prompt and padding are -100
    attention_mask [[1, 1, 1], [1, 1, 1]]

The default layout (`collate_shared_prefix`) puts each pair as one segment [prompt, chosen, rejected]
and every segment of the batch into one row with no padding, attention computed segment by segment
(block attention, blocks.py; models that need more than a causal mask get several segments per row
behind a dense block mask instead); `collate_packed` does the same for SFT sequences. Both list the
scored tokens explicitly (row, predecessor position, target, output slot).

`SequenceLogProbs` wraps the causal LM so one forward returns per-sequence summed log-probs. It runs the
decoder, then the lm_head ONLY at positions whose next token is a completion token, in chunks of
tokens with an fp32 logsumexp (head.py): full-vocabulary logits are never built for prompt positions,
and for completion positions only one chunk at a time. Wrapping (rather
than calling submodules from the loop) keeps DDP/FSDP hooks on the module that accelerate prepares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from dpoflow.lm.blocks import NO_MASK, Blocks, checked, enable_blocks
from dpoflow.lm.head import head_logps, tied_rows
from dpoflow.memory import logit_budget
from dpoflow.meter import Meter

IGNORE = -100


@dataclass
class TokenizedPairs:
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    truncated: int  # pairs shortened to max_length (keep_start)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def forward_tokens(self, shared_prefix: bool) -> list[int]:
        """Tokens each pair puts through the model: prompt once (shared prefix) or twice (concatenated)."""
        twice = 0 if shared_prefix else 1
        return [(1 + twice) * len(p) + len(c) + len(r) for p, c, r in
                zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)]

    def scored_tokens(self) -> list[int]:
        """Tokens each pair puts through the output head: its two completions."""
        return [len(c) + len(r) for c, r in zip(self.chosen_ids, self.rejected_ids)]


def tokenize_prompt(tokenizer, prompt: str, prompt_messages: str = "") -> list[int]:
    """Prompt tokens: the chat template of `prompt_messages` (with the generation prompt) when the
    tokenizer has one, else the prompt text with the tokenizer's own special tokens (e.g. BOS)."""
    if prompt_messages and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(json.loads(prompt_messages), tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_completions(tokenizer, prompt: str, prompt_messages: str, completions: list[str]):
    """(prompt_ids, [completion_ids + EOS, ...]) tokenized the way TRL 1.x does it.

    Each completion is tokenized together with its prompt, and it starts where the joint tokens stop
    matching the prompt's tokens: a word split across the boundary ("The mov" + "ie") is scored as the
    tokens the model really sees. The prompt keeps the common part (shared by all completions).
    """
    prompt_ids = tokenize_prompt(tokenizer, prompt, prompt_messages)
    if prompt_messages and getattr(tokenizer, "chat_template", None):
        # the whole conversation through the template, which closes the assistant turn itself
        messages = json.loads(prompt_messages)
        joint = [tokenizer(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": c}],
                                                         tokenize=False), add_special_tokens=False)["input_ids"]
                 for c in completions]
        end = []
    else:
        joint = [tokenizer(prompt + c)["input_ids"] for c in completions]
        end = [tokenizer.eos_token_id]
    shared = min(_common_prefix_length(prompt_ids, ids) for ids in joint)
    return prompt_ids[:shared], [ids[shared:] + end for ids in joint]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def pad_right(sequences: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token and label rows to one width: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    label_tensor = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (sequence, label) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        label_tensor[row, : len(label)] = torch.tensor(label)
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}


def pack_rows(lengths: list[int], capacity: int | None = None) -> list[list[int]]:
    """First-fit decreasing: group items (by index) into rows of at most `capacity` tokens (default:
    the longest item, so a row is never wider than the widest unpacked row would be). Deterministic."""
    capacity = capacity or max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[item] <= free:
                rows[row].append(item)
                room[row] -= lengths[item]
                break
        else:
            rows.append([item])
            room.append(capacity - lengths[item])
    return rows


class _PackedRows:
    """The tensors both packed layouts fill: sequences (items) placed in rows, restarting positions, who
    may attend to whom, and the scored tokens listed one by one (row, position of the predecessor's
    hidden state, target token, output slot).

    Each item attends within itself only, along causal chains (`attend`): with `blocks` (block
    attention, blocks.py) every item goes into one row with no padding and its chains are attention
    blocks; else a boolean (rows, T, T) mask (True = may attend) is filled chain by chain."""

    def __init__(self, lengths: list[int], pad_token_id: int, pack: bool, capacity: int | None = None,
                 blocks: bool = False):
        self.lengths = lengths
        if blocks:
            self.rows = [list(range(len(lengths)))]
        else:
            self.rows = pack_rows(lengths, capacity) if pack else [[j] for j in range(len(lengths))]
        self.width = max(sum(lengths[j] for j in row) for row in self.rows)
        self.input_ids = torch.full((len(self.rows), self.width), pad_token_id, dtype=torch.long)
        self.position_ids = torch.zeros((len(self.rows), self.width), dtype=torch.long)
        self.blocks: list | None = [] if blocks else None
        self.allowed = None if blocks else torch.zeros((len(self.rows), self.width, self.width), dtype=torch.bool)
        self.causal = None if blocks else torch.tril(torch.ones(self.width, self.width, dtype=torch.bool))
        self.score = {"rows": [], "positions": [], "targets": [], "index": []}

    def items(self):
        """(row, offset, item) for every item; a row's padding then attends to itself (no NaN), never scored."""
        for row, members in enumerate(self.rows):
            at = 0
            for j in members:
                yield row, at, j
                at += self.lengths[j]
            if self.allowed is not None:
                self.allowed[row, at:, at:] = self.causal[:self.width - at, :self.width - at]

    def attend(self, row: int, chains: list[tuple[list[int], int]]) -> None:
        """Tokens of `row` attend along causal chains (blocks.py): (positions, first) = a chain's
        positions in order, and from which index on they are its outputs (the rest are read only)."""
        if self.blocks is not None:
            self.blocks += chains
            return
        for positions, first in chains:  # each output sees the chain up to itself
            index = torch.tensor(positions)
            n = len(positions)
            self.allowed[row, index[first:, None], index[None, :]] = self.causal[first:n, :n]

    def scored(self, row: int, predecessors: list[int], targets: list[int], slot: int) -> None:
        self.score["rows"] += [row] * len(targets)
        self.score["positions"] += predecessors[:len(targets)]  # an empty completion scores nothing
        self.score["targets"] += targets
        self.score["index"] += [slot] * len(targets)

    def batch(self, num_sequences: int) -> dict:
        batch = {"input_ids": self.input_ids, "position_ids": self.position_ids,
                 **{f"score_{key}": torch.tensor(value, dtype=torch.long) for key, value in self.score.items()},
                 "num_sequences": torch.tensor(num_sequences)}
        if self.blocks is not None:
            batch["blocks"] = Blocks(self.blocks, self.width)
        else:
            batch["attention_mask"] = self.allowed
        return batch


def collate_packed(sequences: list[list[int]], labels: list[list[int]], pad_token_id: int,
                   pack: bool = True, blocks: bool = False) -> dict[str, torch.Tensor]:
    """Sequences (SFT) with no padding between them: with `blocks`, all in one row, each a causal
    attention block; else several per row (first-fit decreasing into rows of max(longest, 3 x mean)
    tokens: wide enough to fill, narrow enough that the dense attention over a row stays cheap) behind
    a block-diagonal causal mask; `pack=False` = one per row. Positions restart at each sequence.
    Scored tokens (label != -100, never a sequence's first) are listed as for `collate_shared_prefix`;
    `score_index` = the sequence."""
    lengths = [len(s) for s in sequences]
    layout = _PackedRows(lengths, pad_token_id, pack, capacity=max(max(lengths), 3 * sum(lengths) // len(lengths)),
                         blocks=blocks)
    for row, at, j in layout.items():
        n = lengths[j]
        layout.input_ids[row, at:at + n] = torch.tensor(sequences[j])
        layout.position_ids[row, at:at + n] = torch.arange(n)
        layout.attend(row, [(list(range(at, at + n)), 0)])
        scored = [t for t in range(1, n) if labels[j][t] != IGNORE]  # token t from position t - 1
        layout.scored(row, [at + t - 1 for t in scored], [labels[j][t] for t in scored], j)
    return layout.batch(len(sequences))


def collate_shared_prefix(pairs: TokenizedPairs, indices, pad_token_id: int, pack: bool = True,
                          blocks: bool = False) -> dict[str, torch.Tensor]:
    """Prefix sharing: each pair is one segment [prompt, chosen, rejected], the prompt encoded once.
    With `blocks` (block attention, blocks.py), every segment goes into one row, no padding at all;
    else with `pack`, several segments share a row (first-fit decreasing into rows as wide as the
    longest segment), so rows carry little padding, or one segment per row.

    Attention keeps segments apart and, inside one, chosen and rejected apart: prompt + chosen are
    causal, rejected tokens see their prompt and earlier rejected tokens, never chosen tokens;
    positions restart at every segment and rejected positions restart right after the prompt, so each
    completion sees exactly what it sees in the concatenated layout.
    What is scored is listed token by token: `score_rows`/`score_positions` = where the predecessor's
    hidden state is, `score_targets` = the token, `score_index` = the output slot (chosen of pair j ->
    j, rejected -> B + j).
    """
    segments = [(pairs.prompt_ids[i], pairs.chosen_ids[i], pairs.rejected_ids[i]) for i in indices]
    layout = _PackedRows([len(p) + len(c) + len(r) for p, c, r in segments], pad_token_id, pack, blocks=blocks)
    for row, at, j in layout.items():
        prompt, chosen, rejected = segments[j]
        p, c, r = len(prompt), len(chosen), len(rejected)
        layout.input_ids[row, at:at + p + c + r] = torch.tensor(prompt + chosen + rejected)
        layout.position_ids[row, at:at + p + c] = torch.arange(p + c)
        layout.position_ids[row, at + p + c:at + p + c + r] = torch.arange(p, p + r)
        prompt_at = list(range(at, at + p))
        layout.attend(row, [(prompt_at + list(range(at + p, at + p + c)), 0),
                            (prompt_at + list(range(at + p + c, at + p + c + r)), p)])
        # the first token of each completion is predicted from the last prompt token
        layout.scored(row, list(range(at + p - 1, at + p + c - 1)), chosen, j)
        layout.scored(row, [at + p - 1] + list(range(at + p + c, at + p + c + r - 1)), rejected, len(segments) + j)
    return layout.batch(2 * len(segments))


@torch.no_grad()
def score_pairs(model, pairs: TokenizedPairs, pad_token_id: int, batch_size: int = 32):
    """Summed log-probs (fp32) and token counts of every pair's chosen and rejected completion, each
    (N, 2): the packed prefix-sharing layout, so a batch costs its real tokens, not its padding."""
    scorer = SequenceLogProbs(model).eval()
    device = next(model.parameters()).device
    sums, counts = [], []
    with Meter("score", len(pairs), "pairs") as meter:
        for start in range(0, len(pairs), batch_size):
            indices = range(start, min(start + batch_size, len(pairs)))
            batch = collate_shared_prefix(pairs, indices, pad_token_id, blocks=scorer.blocks)
            batch_sums, batch_counts = scorer({k: v.to(device) for k, v in batch.items()})
            sums.append(batch_sums.view(2, -1).T.cpu())
            counts.append(batch_counts.view(2, -1).T.cpu())
            meter.to(indices.stop)
    return torch.cat(sums), torch.cat(counts)


def score_sequences(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                    batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (fp32) and token counts of already-tokenized completions given their prompts."""
    pairs = TokenizedPairs(prompt_ids, completion_ids, [[] for _ in prompt_ids], 0)
    sums, counts = score_pairs(model, pairs, pad_token_id, batch_size)
    return sums[:, 0], counts[:, 0]


class SequenceLogProbs(nn.Module):
    """forward(batch) -> (summed completion log-probs per row (R,), completion token counts (R,)).
    `blocks`: whether the model takes packed batches with block attention (blocks.py), decided once."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.blocks = enable_blocks(model)
        self.budget = logit_budget(model)
        self.keep_budget = 0  # bytes of logits a training forward may keep whole (DPO's parts: memory.py)
        config = model.config.get_text_config(decoder=True)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        # a 4-D mask reaches attention as given: a sliding window must be in it (transformers adds it
        # only to the masks it builds itself); models that mix layer kinds take one mask per kind
        self.layer_types = set(getattr(config, "layer_types", None) or [])
        window = getattr(config, "sliding_window", None)
        self.window = window if window and (not self.layer_types or "sliding_attention" in self.layer_types) else None

    def _token_logps(self, hidden: torch.Tensor, targets: torch.Tensor, tied: dict | None) -> torch.Tensor:
        """Log-prob of each target token from its predecessor's hidden state; (N, H) -> (N,), fp32, in
        chunks of tokens (head.py), never the full logits."""
        return head_logps(hidden, self.model.get_output_embeddings(), targets, budget=self.budget,
                          softcap=self.softcap, keep_budget=self.keep_budget, tied=tied)

    def _hidden(self, input_ids, attention_mask, position_ids=None, **attention) -> tuple[torch.Tensor, dict | None]:
        """The decoder's last hidden states, and the tied head's gradient hand-off (head.tied_rows)."""
        decoder = self.model.get_decoder()
        with tied_rows(self.model) as tied:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, **attention).last_hidden_state, tied

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "score_index" in batch:
            return self._forward_shared_prefix(batch)
        attention_mask = batch["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden, tied = self._hidden(batch["input_ids"], attention_mask, position_ids)  # (R, T, H)
        labels = batch["labels"][:, 1:]  # token t is scored from position t-1
        rows, positions = (labels != IGNORE).nonzero(as_tuple=True)
        token_logps = self._token_logps(hidden[:, :-1][rows, positions], labels[rows, positions], tied)
        sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
        counts = (labels != IGNORE).sum(-1)
        return sums, counts

    def _dense_mask(self, batch):
        """(rows, 1, T, T): True = may attend (SDPA), or 0 / -inf added to the scores (eager attention,
        which adds whatever mask it gets). With a sliding window a token sees only keys fewer than
        `window` positions back in its own sequence (transformers' rule: kv > q - window)."""
        masks = {"full_attention": batch["attention_mask"][:, None, :, :]}
        if self.window is not None:
            positions = batch["position_ids"]
            masks["sliding_attention"] = masks["full_attention"] & (
                (positions[:, :, None] - positions[:, None, :]) < self.window)[:, None]
            if len(self.layer_types) < 2:  # one kind of layer, all windowed
                masks = {"full_attention": masks["sliding_attention"]}
        if self.model.config._attn_implementation == "eager":
            dtype = next(self.model.parameters()).dtype
            masks = {kind: torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(dtype).min) for kind, mask in masks.items()}
        return masks if len(masks) > 1 else masks["full_attention"]

    def _forward_shared_prefix(self, batch):
        if "blocks" in batch:  # one row, attention by causal blocks
            with checked(self.model, batch["blocks"]):
                hidden, tied = self._hidden(batch["input_ids"], NO_MASK.to(batch["input_ids"].device),
                                            batch["position_ids"], dpoflow_blocks=batch["blocks"])
        else:
            hidden, tied = self._hidden(batch["input_ids"], self._dense_mask(batch), batch["position_ids"])
        token_logps = self._token_logps(hidden[batch["score_rows"], batch["score_positions"]], batch["score_targets"],
                                        tied)
        slots, n = batch["score_index"], int(batch["num_sequences"])
        sums = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(0, slots, token_logps)
        return sums, torch.bincount(slots, minlength=n)
