"""Block attention: packed sequences attend block by block, and nothing is computed across blocks.

A packed batch is one row of every token, no padding (the linear layers see real tokens only).
Which token sees which is a list of *blocks*: a block is a contiguous span of the row and a
boolean mask over it (True = may attend), or None for plain causal attention:

    prefix sharing, pair [prompt p | chosen c | rejected r] at offset a: span [a, a+p+c+r), mask =
        prompt + chosen causal; rejected sees the prompt and earlier rejected tokens, never chosen
    SFT packing, sequence of n tokens at offset a: span [a, a+n), causal

Each attention layer gathers q, k, v into right-padded blocks, batched by similar length, and runs
SDPA on them (`is_causal` for causal groups: right padding is never seen by a real query; else the
blocks' masks); each token's output is gathered back from its block. Against one dense mask over a
packed row this computes no scores between blocks and needs no T x T mask. Exact: the same softmax
over the same keys (tests compare it with the dense mask, gradients included).

It runs through transformers' attention interface (`AttentionInterface`, `enable_blocks`); models
whose attention does not go through the interface, or that need a sliding window or logit
soft-capping, keep the dense block mask (`supports_blocks`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

IMPLEMENTATION = "dpoflow_blocks"
GROUP_RATIO = 0.75  # blocks batched together are >= this fraction of the group's longest


class Blocks:
    """Gather/scatter indices and masks for one packed batch of `total` tokens in one row;
    `blocks` = (start, length, mask (length x length, bool) or None for causal), covering every token once."""

    def __init__(self, blocks: list[tuple[int, int, torch.Tensor | None]], total: int):
        scatter = [-1] * total  # each token's output slot
        self.groups: list[tuple[torch.Tensor, int, int, torch.Tensor | None]] = []  # (gather, blocks, width, mask)
        order = sorted(range(len(blocks)), key=lambda b: (-blocks[b][1], b))
        slot, first = 0, 0
        while first < len(order):
            width = max(1, blocks[order[first]][1])
            last = first + 1
            while last < len(order) and blocks[order[last]][1] >= GROUP_RATIO * width:
                last += 1
            members = [blocks[b] for b in order[first:last]]
            gather = []
            masked = any(mask is not None for _, _, mask in members)
            masks = torch.zeros(len(members), 1, width, width, dtype=torch.bool) if masked else None
            for i, (start, length, mask) in enumerate(members):
                for t in range(length):
                    if scatter[start + t] >= 0:
                        raise ValueError(f"token {start + t} is in two attention blocks")
                    scatter[start + t] = slot + t
                gather += list(range(start, start + length)) + [max(start, start + length - 1)] * (width - length)
                if masks is not None:
                    masks[i, 0].fill_diagonal_(True)  # a padding query sees itself only (no empty softmax row)
                    masks[i, 0, :length, :length] = torch.ones(length, length, dtype=torch.bool).tril() \
                        if mask is None else mask
                slot += width
            self.groups.append((torch.tensor(gather, dtype=torch.long), len(members), width, masks))
            first = last
        if min(scatter, default=0) < 0:
            raise ValueError("a token belongs to no attention block")
        self.scatter = torch.tensor(scatter, dtype=torch.long)
        self.calls = 0

    def to(self, device) -> Blocks:
        self.groups = [(index.to(device), n, width, None if masks is None else masks.to(device))
                       for index, n, width, masks in self.groups]
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
    heads, kv_heads = query.shape[1], key.shape[1]
    tokens = [x[0].transpose(0, 1) for x in (query, key, value)]  # (T, H, D) views
    outputs = []
    for index, n, width, masks in dpoflow_blocks.groups:
        q, k, v = (x.index_select(0, index).view(n, width, x.shape[1], x.shape[2]).transpose(1, 2) for x in tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks, dropout_p=dropout, is_causal=masks is None,
                                             scale=scaling, enable_gqa=kv_heads != heads)  # (n, Hq, width, D)
        outputs.append(out.transpose(1, 2).reshape(n * width, heads, -1))
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
