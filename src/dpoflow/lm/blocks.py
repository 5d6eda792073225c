"""Block attention: packed sequences attend chain by chain, and nothing is computed across chains.

A packed batch is one row of every token, no padding (the linear layers see real tokens only).
Which token sees which is a list of *chains*: a chain is a sequence of positions of the row that
attends causally along itself, and the tokens whose output it gives: all of them, or those from an
index `first` on (the tokens before are keys only: another chain gives their output):

    prefix sharing, pair [prompt p | chosen c | rejected r] at offset a: two chains,
        [a, a+p+c), first 0                    prompt + chosen: causal
        [a, a+p) + [a+p+c, a+p+c+r), first p   rejected queries over prompt + rejected keys
    SFT packing, sequence of n tokens at offset a: one chain [a, a+n), first 0

Each attention layer gathers q, k, v into right-padded chains, batched by similar length, and runs
SDPA on them: chains from 0 with `is_causal` (right padding is never seen by a real query); chains
from `first` with their queries only, under a mask that is causal aligned to the last key (query j
sees keys 0..first+j). Each token's output is gathered back from its chain; the gradients of a key
read by two chains (a prompt's) add up in the gather's backward. Against one dense mask over a
packed row this computes no scores between pairs, and inside a pair none between chosen and
rejected, none twice: the rejected queries alone (r x (p + r) scores, not (p + c + r)^2). Exact: the
same softmax over the same keys (tests compare it with the dense mask, gradients included).

It runs through transformers' attention interface (`AttentionInterface`, `enable_blocks`); models
whose attention does not go through the interface, or that need a sliding window or logit
soft-capping, keep the dense block mask (`supports_blocks`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

IMPLEMENTATION = "dpoflow_blocks"
GROUP_RATIO = 0.75  # chains batched together have >= this fraction of the group's longest keys and queries


class Blocks:
    """Gather/scatter indices and masks for one packed batch of `total` tokens in one row; `chains` =
    (positions, first): a chain's positions in causal order, and the index from which on they are its
    queries (and take their output from it). Every token is the output of exactly one chain.
    `groups` = (query index, key index, chains, query width, key width, mask or None for causal)."""

    def __init__(self, chains: list[tuple[list[int], int]], total: int):
        scatter = [-1] * total  # each token's output slot
        self.groups: list[tuple] = []
        chains = [(list(positions), first) for positions, first in chains if first < len(positions)]
        members: list[tuple[list[int], int]] = []
        for chain in sorted(chains, key=lambda chain: (chain[1] > 0, -len(chain[0]))):  # stable
            if members and not self._fits(members, chain):
                self._group(members, scatter)
                members = []
            members.append(chain)
        if members:
            self._group(members, scatter)
        if min(scatter, default=0) < 0:
            raise ValueError("a token is the output of no attention chain")
        self.scatter = torch.tensor(scatter, dtype=torch.long)
        self.calls = 0

    @staticmethod
    def _fits(members, chain) -> bool:
        (longest, first), (positions, chain_first) = members[0], chain
        if (chain_first > 0) != (first > 0) or len(positions) < GROUP_RATIO * len(longest):
            return False
        queries = max(len(p) - f for p, f in members)
        return min(queries, len(positions) - chain_first) >= GROUP_RATIO * max(queries, len(positions) - chain_first)

    def _group(self, members, scatter: list[int]) -> None:
        slot = sum(n * width for _, _, n, width, _, _ in self.groups)
        key_width = max(len(positions) for positions, _ in members)
        query_width = max(len(positions) - first for positions, first in members)
        queries, keys = [], []
        masked = members[0][1] > 0
        mask = torch.zeros(len(members), 1, query_width, key_width, dtype=torch.bool) if masked else None
        for i, (positions, first) in enumerate(members):
            for j, token in enumerate(positions[first:]):
                if scatter[token] >= 0:
                    raise ValueError(f"token {token} is the output of two attention chains")
                scatter[token] = slot + i * query_width + j
            keys += positions + positions[-1:] * (key_width - len(positions))  # right padding: the last token again
            queries += positions[first:] + positions[-1:] * (query_width - len(positions) + first)
            if mask is not None:
                n, m = len(positions), len(positions) - first
                mask[i, 0, :m, :n] = torch.ones(m, n, dtype=torch.bool).tril(first)  # query j: keys 0..first+j
                mask[i, 0, m:, 0] = True  # a padding query sees one key (no empty softmax row)
        key_index = torch.tensor(keys, dtype=torch.long)
        query_index = torch.tensor(queries, dtype=torch.long) if masked else key_index
        self.groups.append((query_index, key_index, len(members), query_width, key_width, mask))

    def to(self, device) -> Blocks:
        self.groups = [(q.to(device), k.to(device), n, qw, kw, None if mask is None else mask.to(device))
                       for q, k, n, qw, kw, mask in self.groups]
        self.scatter = self.scatter.to(device)
        return self


def block_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    dpoflow_blocks: Blocks | None = None, **kwargs):
    """The attention function of `IMPLEMENTATION`: q (1, Hq, T, D), k/v (1, Hkv, T, D) -> (1, T, Hq, D)."""
    if dpoflow_blocks is None:  # e.g. generation with this model while the implementation is switched on
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"block attention takes one packed row, got {query.shape[0]}")
    dpoflow_blocks.calls += 1
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    q_tokens, k_tokens, v_tokens = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D) views
    outputs = []
    for query_index, key_index, n, query_width, key_width, mask in dpoflow_blocks.groups:
        q = q_tokens.index_select(0, query_index).view(n, query_width, heads, dim).transpose(1, 2)
        k, v = (x.index_select(0, key_index).view(n, key_width, kv_heads, x.shape[2]).transpose(1, 2)
                for x in (k_tokens, v_tokens))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                             scale=scaling, enable_gqa=kv_heads != heads)  # (n, Hq, width, D)
        outputs.append(out.transpose(1, 2).reshape(n * query_width, heads, -1))
    flat = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return flat.index_select(0, dpoflow_blocks.scatter).unsqueeze(0), None


def supports_blocks(model) -> bool:
    """Whether `model`'s attention runs through transformers' interface as SDPA with nothing but a
    causal mask (no sliding window, no logit soft-capping)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return (bool(getattr(model, "_supports_attention_backend", False))
            and model.config._attn_implementation in ("sdpa", IMPLEMENTATION)
            and getattr(config, "sliding_window", None) is None
            and getattr(config, "attn_logit_softcapping", None) is None
            and not getattr(config, "is_encoder_decoder", False))


def enable_blocks(model) -> bool:
    """Give `model` the block attention implementation when it `supports_blocks`; it is SDPA itself
    (same function, same masks) whenever a forward passes no blocks, e.g. generation. Set for good,
    not per forward: a backward that recomputes activations (gradient checkpointing) runs the
    attention again outside any forward of ours. Not saved with the model."""
    if not supports_blocks(model):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, block_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, AttentionMaskInterface._global_mapping["sdpa"])
    model.config._attn_implementation = IMPLEMENTATION
    return True


# a 4-D mask is passed through by transformers' mask creation untouched: the block forward passes
# this one so that no (T, T) mask is built for a row that block attention does not need
NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


@contextmanager
def checked(model, blocks: Blocks):
    """Run one block forward of `model`, refusing it if the attention never saw the blocks."""
    blocks.calls = 0
    yield
    if blocks.calls == 0:
        raise RuntimeError(f"{type(model).__name__} did not route its attention through transformers' attention "
                           "interface, so packed sequences would attend across each other; this model needs "
                           "dpo.packing=false")
