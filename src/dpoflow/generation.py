"""Sampling completions for pairs and evaluation: our own decode loop over the model's forward.

Prompts run in length-sorted batches of `batch_size` rows (k samples of a prompt are k rows), left
padded. The KV cache is preallocated per batch (each step writes one position instead of copying
the whole cache, as HF's dynamic cache does); rows that have ended leave the batch; a token is drawn
by inverse CDF from one uniform per row (`torch.multinomial` draws one exponential per vocabulary
entry); the batch ends when every row has hit EOS. Sampling follows HF `generate`: logits /
temperature, then `TopKLogitsWarper`'s and `TopPLogitsWarper`'s cuts, greedy at temperature 0 (tests
check the law and the greedy tokens), with one fp32 copy of the logits per step.
bench/README.md has the figures.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dpoflow.meter import Meter


class _PreallocatedLayer(DynamicLayer):
    """A layer's keys and values in one buffer of the batch's final length; attention reads a view
    of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_empty(batch, heads, self.capacity, dim)
        self._values = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def _new_cache(model, capacity: int) -> Cache:
    config = model.config.get_text_config(decoder=True)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) or layer_types != {"full_attention"}:
        return DynamicCache(config=config)  # sliding-window layers keep HF's own cache
    return Cache(layers=[_PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)])


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                top_k: int = 0) -> torch.Tensor:
    """One token per row of next-token logits: greedy at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top-k tokens (those at least as likely as the k-th),
    then to the top-p nucleus (HF's rule: drop the tokens whose ascending cumulative probability is
    ≤ 1 − top_p, never the most likely one).

    One fp32 (rows × vocabulary) buffer per call, everything else in place or per few rows: at 152k
    entries a copy per operation (sort, softmax, cumsum, scatter) would be ten of them."""
    if temperature == 0:
        return logits.argmax(-1)
    x = logits.to(torch.float32, copy=True)
    if temperature != 1:
        x.div_(temperature)
    if 0 < top_k < x.shape[-1]:
        x.masked_fill_(x < x.topk(top_k, -1).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        x.masked_fill_(x < _nucleus_floor(x, top_p), float("-inf"))
    cdf = x.sub_(x.max(-1, keepdim=True).values).exp_().cumsum_(-1)  # unnormalised: the draw scales by the total
    draw = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


def _nucleus_floor(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """(rows, 1): the least logit inside each row's top-p nucleus, found by sorting a few rows at a time."""
    floor = torch.empty(x.shape[0], 1, dtype=x.dtype, device=x.device)
    step = max(1, (64 << 20) // (x.shape[1] * 24))  # sorted values, their indices and probabilities: ≤ 64 MB
    for start in range(0, x.shape[0], step):
        ascending = x[start:start + step].sort(-1).values
        drop = ascending.softmax(-1).cumsum_(-1) <= 1 - top_p
        drop[:, -1] = False
        floor[start:start + step] = ascending.gather(1, drop.sum(-1, keepdim=True))
    return floor


@torch.no_grad()
def _decode(model, input_ids, attention_mask, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
            eos: int, pad: int, generator: torch.Generator, on_token=None) -> torch.Tensor:
    """New tokens (rows × max_new_tokens, pad after EOS) for left-padded prompts. Rows that have
    ended leave the batch (and its cache) once they are a quarter of it: they cost a full row each
    step otherwise. `on_token(fraction)` after each position (progress)."""
    rows, device = input_ids.shape[0], input_ids.device
    cache = _new_cache(model, input_ids.shape[1] + max_new_tokens)
    mask = None if bool(attention_mask.all()) else attention_mask  # no padding: plain causal attention
    positions = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
    out = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)  # the out row of each batch row
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    step_ids = input_ids
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        tokens = pick_tokens(logits, temperature, top_p, generator, top_k).masked_fill_(done, pad)
        out[live, t] = tokens
        if on_token is not None:
            on_token((t + 1) / max_new_tokens)
        done |= tokens == eos
        ended = int(done.sum())
        if ended == len(done):
            break
        step_ids, positions = tokens[:, None], positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(done), 1)], dim=1)
        if 4 * ended >= len(done):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            live, done, step_ids, positions = live[keep], done[keep], step_ids[keep], positions[keep]
            mask = None if mask is None else mask[keep]
    return out


def generate_ids(model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 48, seed: int = 0,
                 batch_size: int = 512, what: str = "generate") -> list[list[list[int]]]:
    """k sampled completions (token ids, up to and including EOS) per prompt. `batch_size` counts rows
    (prompts × samples), fewer where the KV cache would outgrow its budget (`_rows_that_fit`). Each
    batch draws from its own generator seeded from (seed, first prompt's place in the sorted order),
    so results do not depend on what ran before. Progress (meter.py) is reported as `what`."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    longest = max((len(ids) for ids in prompt_ids), default=0) + max_new_tokens
    per_batch = max(1, min(batch_size, _rows_that_fit(model, longest)) // num_samples)
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    meter = Meter(what, len(order) * num_samples, "samples")
    for start in range(0, len(order), per_batch):
        members = order[start:start + per_batch]
        rows, before = len(members) * num_samples, start * num_samples
        width = max(len(prompt_ids[i]) for i in members)
        input_ids = torch.full((len(members), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(members):
            input_ids[row, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            attention_mask[row, width - len(prompt_ids[i]):] = 1
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        new = _decode(model, input_ids.repeat_interleave(num_samples, 0).to(device),
                      attention_mask.repeat_interleave(num_samples, 0).to(device), max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, top_k=top_k, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                      generator=generator, on_token=lambda fraction, b=before, r=rows: meter.to(b + r * fraction))
        completions = [_until_eos(row, tokenizer.eos_token_id) for row in new.tolist()]
        for position, i in enumerate(members):
            results[i] = completions[position * num_samples:(position + 1) * num_samples]
        meter.to(before + rows)
    meter.close()
    return results


def _rows_that_fit(model, length: int) -> int:
    """Rows whose KV cache of `length` tokens fits the budget: half the free GPU memory, 4 GiB on CPU."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parameter = next(model.parameters())
    per_token = 2 * config.num_hidden_layers * heads * head_dim * parameter.element_size()
    budget = torch.cuda.mem_get_info(parameter.device)[0] // 2 if parameter.is_cuda else 4 << 30
    return max(1, budget // (per_token * max(1, length)))


def _until_eos(row: list[int], eos: int) -> list[int]:
    """A generated row cut after its first EOS (kept); the rest is padding."""
    return row[:row.index(eos) + 1] if eos in row else row


def sample_completions(model, tokenizer, prompts: list[str], *, prompt_messages: list[str] | None = None,
                       **settings) -> list[list[str]]:
    """Decoded completions per prompt; `settings` as for `generate_ids`."""
    from dpoflow.lm.logprobs import tokenize_prompt

    messages = prompt_messages or [""] * len(prompts)
    encoded = [tokenize_prompt(tokenizer, p, m) for p, m in zip(prompts, messages)]
    return [tokenizer.batch_decode(samples, skip_special_tokens=True)
            for samples in generate_ids(model, tokenizer, encoded, **settings)]
