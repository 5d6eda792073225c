"""Block attention: packed sequences attend as causal blocks, and nothing is computed across blocks.

A packed batch is one row of every token, no padding (the linear layers see real tokens only). Which
token sees which is a list of *blocks*, each a list of token positions that attend causally among
themselves in that order:

    prefix sharing, pair [prompt p | chosen c | rejected r] at offset a:
        block [a .. a+p+c)                       prompt + chosen
        block [a .. a+p) + [a+p+c .. a+p+c+r)    prompt + rejected (keys skip the chosen tokens)
    SFT packing, sequence of n tokens at offset a:  block [a .. a+n)

Each attention layer gathers q, k, v into right-padded blocks (batched by similar length), runs SDPA
with `is_causal=True` — the causal kernels skip the blocks above the diagonal, and right padding is
never seen by a real query — and gathers each token's output back from the block it belongs to (a
prompt token: from its prompt + chosen block). Against one dense block mask over a packed row this
computes ~1.1x the causal attention FLOPs of the pairs instead of ~2.6x, and the row needs no
T x T mask. Exact: the same softmax over the same keys (tests compare it with the dense mask).

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
    """Gather/scatter indices for one packed batch (`total` tokens, one row)."""

    def __init__(self, blocks: list[list[int]], total: int):
        owner = [-1] * total  # each token's output slot: the first block listing it
        self.groups: list[tuple[torch.Tensor, int, int]] = []  # (gather index, blocks, width)
        slot = 0
        order = sorted(range(len(blocks)), key=lambda b: -len(blocks[b]))
        start = 0
        while start < len(order):
            width = max(1, len(blocks[order[start]]))
            end = start
            while end < len(order) and len(blocks[order[end]]) >= GROUP_RATIO * width:
                end += 1
            end = max(end, start + 1)
            gather = []
            for b in order[start:end]:
                tokens = blocks[b]
                for i, token in enumerate(tokens):
                    if owner[token] < 0:
                        owner[token] = slot + i
                pad = tokens[-1] if tokens else 0  # right padding: no real query sees it
                gather += tokens + [pad] * (width - len(tokens))
                slot += width
            self.groups.append((torch.tensor(gather, dtype=torch.long), end - start, width))
            start = end
        if min(owner, default=0) < 0:
            raise ValueError("a token belongs to no attention block")
        self.scatter = torch.tensor(owner, dtype=torch.long)
        self.calls = 0

    def to(self, device) -> Blocks:
        self.groups = [(index.to(device), n, width) for index, n, width in self.groups]
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
    for index, n, width in dpoflow_blocks.groups:
        q, k, v = (x.index_select(0, index).view(n, width, x.shape[1], x.shape[2]).transpose(1, 2) for x in tokens)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=kv_heads != heads)  # (n, Hq, width, D)
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
