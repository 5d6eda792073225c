"""How much memory a step may spend beyond its model and optimizer state, in two budgets:

- the **logit budget** (lm/head.py): how many tokens go through the output head at a time when
  scoring (training: below). A chunk of a few hundred tokens runs the head's GEMM at full speed,
  so this budget is small: a quarter of the weights, at least 256 MiB, at most an eighth of the
  free memory. At 152k vocabulary rows and fp32 that is ~220 tokens per chunk for a 0.5B model,
  ~3,400 for a 7B model in bf16; the 2k vocabulary of the demo fits every logit at once.
- the **activation budget** (the DPO micro-batch): one forward whenever its activations fit; only
  beyond it does a micro-batch run in parts. The scored tokens' logits count as activations here:
  parts are sized so that the decoder's activations and the logits (vocabulary x 8 bytes per scored
  token) fit together, and the head keeps them for its backward instead of recomputing them
  (`training_costs`), which saves one of its four (tokens x hidden x vocabulary) GEMMs. On a GPU
  the budget is half of what is free once the gradients and Adam's two moments of the trainable
  weights (3 x their bytes, allocated at the first step) are set aside: each part costs its kernel
  launches again, which doubled small steps on an H100. On a CPU parts cost little when they are
  even and the GEMMs stay large (the bench's 2,343-token micro-batch: 2 parts +0.3 %, 3 parts
  +0.9 %, 4 parts +2.6 % per step, alternated in one process), so the budget is also capped at the
  trainable weights' size: the step's memory stays near its training state (weights, gradients,
  Adam's moments) instead of growing with whatever the machine has free. At least 256 MiB.

Free memory: `torch.cuda.mem_get_info` on a GPU; on a CPU the machine's available memory or the
container's cgroup limit, whichever is less. `DPOFLOW_LOGIT_BUDGET_MB` and
`DPOFLOW_ACTIVATION_BUDGET_MB` set them outright (a shared node, a known limit; with the logit
budget set, training keeps no more logits than it allows). Budgets decide how work is cut, never
what is computed: every budget gives the same numbers (tested).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MIB = 1 << 20


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit (a container's), or None if unlimited."""
    try:
        base = Path("/sys/fs/cgroup")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def free_bytes(device: torch.device) -> int:
    """Memory free on `device` now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    available = psutil.virtual_memory().available
    cgroup = _cgroup_free()
    return min(available, cgroup) if cgroup is not None else available


def _override(name: str) -> int | None:
    value = os.environ.get(name)
    return int(float(value) * MIB) if value else None


def logit_budget(model: torch.nn.Module) -> int:
    """Bytes of logits a forward or backward may hold at once (module docstring)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    free = free_bytes(next(model.parameters()).device)
    return _override("DPOFLOW_LOGIT_BUDGET_MB") or max(MIB, min(free // 8, max(256 * MIB, weights // 4)))


def activation_budget(model: torch.nn.Module) -> int:
    """Bytes of activations one training forward may keep for its backward (module docstring)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    device = next(model.parameters()).device
    budget = (free_bytes(device) - 3 * trainable) // 2
    if device.type != "cuda":
        budget = min(budget, trainable)
    return _override("DPOFLOW_ACTIVATION_BUDGET_MB") or max(256 * MIB, budget)


def _text_config(config):
    """The decoder's config of a multimodal model's, or the config itself."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def activation_bytes_per_token(config, element_size: int) -> int:
    """What one token's activations kept for the backward cost across the decoder, estimated for a
    Llama-style block (norms, q/k/v/o, the residual stream, the gated MLP's four intermediate
    tensors): 16 x hidden + 4 x intermediate values per layer."""
    config = _text_config(config)
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return config.num_hidden_layers * (16 * config.hidden_size + 4 * intermediate) * element_size


def training_costs(config, element_size: int, forward_tokens: list[int], scored_tokens: list[int],
                   budget: int) -> tuple[list[int], int]:
    """What each example's forward keeps for its backward, in bytes: the decoder's activations, and
    the logits of its scored tokens unless `DPOFLOW_LOGIT_BUDGET_MB` bounds them; and the bytes of
    logits a forward may keep whole (0: the head chunks and recomputes within the logit budget)."""
    from dpoflow.lm.head import BYTES_PER_LOGIT

    keep = 0 if _override("DPOFLOW_LOGIT_BUDGET_MB") else budget
    per_scored = BYTES_PER_LOGIT * _text_config(config).vocab_size if keep else 0
    per_token = activation_bytes_per_token(config, element_size)
    return [t * per_token + s * per_scored for t, s in zip(forward_tokens, scored_tokens)], keep
