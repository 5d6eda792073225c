"""Token log-probs through the output head without holding the (tokens x vocabulary) logits.

    log p(t | h) = z_t - logsumexp(z),   z = W h (+ b), soft-capped as the model does, in fp32

At 152k vocabulary rows one scored token's fp32 logits take 0.6 MB: a scoring batch of 25,600 tokens
would hold 15.5 GB, twice over with its log-softmax. Here the tokens go through the head in chunks
sized from a memory budget; the forward keeps only each token's logsumexp, and the backward
recomputes a chunk's logits and turns them into the gradient in place:

    d log p(t | h) / dz = onehot(t) - softmax(z)      (x the soft-cap's 1 - tanh^2 where there is one)
    dh = G W,  dW = G^T h,  db = sum G               G = upstream gradient x the above, per chunk

so peak memory grows with chunk x vocabulary. When every logit fits the budget at once there is one
chunk and its softmax is kept for the backward: no recomputation (what a small vocabulary gets).

A tied head (its weight is the input embedding's, as in Qwen2.5-0.5B or Llama-3.2-1B) gets its two
gradients in one buffer: the embedding's rows are added in place to the (vocabulary x hidden)
gradient the head's backward made (`tied_rows`), where autograd would build a second dense one
just to sum them (545 MB at 152k rows x 896, fp32).

The fast path needs the head's weight itself: a plain `nn.Linear` without hooks. Any other head (a
LoRA-wrapped one, one that FSDP or DeepSpeed gather through hooks) goes chunk by chunk through the
module under activation checkpointing: the same memory bound, autograd's own backward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BYTES_PER_LOGIT = 8  # an fp32 chunk of logits and one more of the same size (logsumexp's or the backward's)


def head_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, *, budget: int,
               softcap: float | None = None, keep_budget: int = 0, tied: dict | None = None) -> torch.Tensor:
    """log p(target | hidden) per row, fp32: (N, H), (N,) -> (N,), with at most `budget` bytes of
    logits alive at a time (one chunk of at least one token), or all of them, kept for the backward,
    when they fit `keep_budget` (a training step that sized its parts to hold them). `tied`: this
    forward's hand-off from `tied_rows` (the head's weight gradient goes there for the embedding's rows)."""
    vocabulary = head.out_features if isinstance(head, nn.Linear) else head.weight.shape[0]
    n = hidden.shape[0]
    whole = n * vocabulary * BYTES_PER_LOGIT <= max(budget, keep_budget)
    chunk = max(1, n if whole else budget // (vocabulary * BYTES_PER_LOGIT))
    if _plain(head):
        keep = whole and torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
        return _HeadLogProbs.apply(hidden, head.weight, head.bias, targets, chunk, softcap, keep, tied)
    if not torch.is_grad_enabled() or whole:
        return torch.cat([_chunk_logps(hidden[s:s + chunk], targets[s:s + chunk], head, softcap)
                          for s in range(0, n, chunk)]) if n else hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat([checkpoint(_chunk_logps, hidden[s:s + chunk], targets[s:s + chunk], head, softcap,
                                 use_reentrant=False) for s in range(0, n, chunk)])


def _plain(head: nn.Module) -> bool:
    from torch.nn.modules import module

    hooked = (head._forward_hooks or head._forward_pre_hooks or module._global_forward_hooks
              or module._global_forward_pre_hooks)
    return type(head) is nn.Linear and not hooked and type(head.weight.data) is torch.Tensor


@contextmanager
def tied_rows(model: nn.Module):
    """While a training forward runs the decoder: if the input embedding is a plain `nn.Embedding`
    whose weight is the head's (tied) and trains, yield a hand-off (a dict) for `head_logps`, and
    the embedding looks tokens up through `_TiedRows`, whose backward adds its rows in place to the
    gradient the head's backward left there; else yield None and change nothing. The head's
    backward runs before the embedding's (the embedding feeds the decoder that feeds the head), and
    autograd stores the weight's gradient only once both have run, so `.grad` (and DDP's hook on it)
    sees the sum. Not for sharded or hooked weights (FSDP, DeepSpeed ZeRO-3): `_plain(head)`."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(embedding, "weight", None)
    if not (type(embedding) is nn.Embedding and head is not None and weight is head.weight and _plain(head)
            and weight.requires_grad and torch.is_grad_enabled() and embedding.max_norm is None
            and not embedding.scale_grad_by_freq and not embedding.sparse):
        yield None
        return
    tied: dict = {}
    embedding.forward = lambda ids: _TiedRows.apply(ids, embedding.weight, embedding.padding_idx, tied)
    try:
        yield tied
    finally:
        del embedding.forward  # the class's own again


class _TiedRows(torch.autograd.Function):
    """`F.embedding(ids, weight, padding_idx)` whose weight gradient is added to the tied head's (above)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, tied):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.tied, ctx.shape = padding_idx, tied, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        rows, flat = grad.reshape(-1, grad.shape[-1]), ids.reshape(-1)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as nn.Embedding's
            keep = flat != ctx.padding_idx
            rows, flat = rows[keep], flat[keep]
        target = ctx.tied.pop("grad", None)
        if target is None:  # the head produced no weight gradient in this graph: a dense one of our own
            return None, grad.new_zeros(ctx.shape).index_add_(0, flat, rows), None, None
        target.index_add_(0, flat, rows.to(target.dtype))
        return None, None, None, None


def _logits(hidden, weight, bias, softcap, dtype=None) -> torch.Tensor:
    """fp32 logits of a chunk; `dtype` = the matmul's (autocast's in the forward, replayed in the backward)."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    z = F.linear(hidden, weight, bias).float()
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _chunk_logps(hidden, targets, head, softcap) -> torch.Tensor:
    z = head(hidden).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, -1)


class _HeadLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, softcap, keep, tied):
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        ctx.kept, ctx.dtype = [], None
        for s in range(0, n, chunk):
            raw = F.linear(hidden[s:s + chunk], weight, bias)  # under autocast: autocast's dtype
            ctx.dtype = raw.dtype
            z = raw.float()
            if softcap:
                z.div_(softcap).tanh_().mul_(softcap)
            lse[s:s + chunk] = torch.logsumexp(z, -1)
            out[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if keep:  # every logit fits the budget: the backward reuses them instead of recomputing
                ctx.kept.append(z)
        ctx.chunk, ctx.softcap, ctx.tied = chunk, softcap, tied
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        chunk, softcap, dtype = ctx.chunk, ctx.softcap, ctx.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        matmul_weight = weight.to(dtype)
        for index, s in enumerate(range(0, hidden.shape[0], chunk)):
            h, g, t = hidden[s:s + chunk].to(dtype), grad[s:s + chunk], targets[s:s + chunk]
            z = ctx.kept[index] if ctx.kept else _logits(h, weight, bias, softcap, dtype)
            slope = 1 - (z / softcap).square_() if softcap else None
            gz = z.sub_(lse[s:s + chunk, None]).exp_().mul_(-g[:, None])  # -g softmax(z), in place
            gz[torch.arange(len(t), device=t.device), t] += g
            if slope is not None:
                gz.mul_(slope)
            gz = gz.to(dtype)
            if need_hidden:
                grad_hidden[s:s + chunk] = gz @ matmul_weight
            if need_weight:
                if dtype == torch.float32:
                    grad_weight.addmm_(gz.T, h)
                else:
                    grad_weight += (gz.T @ h).float()
            if need_bias:
                grad_bias += gz.sum(0).float()
        ctx.kept = []
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
            if ctx.tied is not None:  # the tied embedding's backward adds its rows here
                ctx.tied["grad"] = grad_weight
        return (grad_hidden, grad_weight, grad_bias.to(bias.dtype) if need_bias else None,
                None, None, None, None, None)
