"""How much working memory a forward/backward may take: the budget that decides how finely the output
head's logits are chunked (dpo/head.py) and whether a DPO micro-batch runs as one forward or in parts.

Working memory = what a step allocates beyond the model's weights, gradients and optimizer state
(activations, logit chunks). The budget is the smaller of

- a quarter of the memory free on the device (GPU: `torch.cuda.mem_get_info`; CPU: the container's
  cgroup limit or the machine's available memory, whichever is less), and
- the larger of 1 GiB and the model's weights: a step never needs more transient memory than the
  state it trains to run at full speed (an output head's GEMM is as fast on 256 rows as on 25,600),
  so a machine with plenty free does not invite a 152k-vocabulary model to hold every logit.

`DPOFLOW_MEMORY_BUDGET_MB` sets it outright (a shared node, a known limit). It only decides how
work is cut, never what is computed: every budget gives the same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FLOOR = 1 << 30


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


def working_memory(model: torch.nn.Module) -> int:
    """The working-memory budget in bytes for steps on `model` (see the module docstring)."""
    override = os.environ.get("DPOFLOW_MEMORY_BUDGET_MB")
    if override:
        return int(float(override) * (1 << 20))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    device = next(model.parameters()).device
    return max(64 << 20, min(free_bytes(device) // 4, max(FLOOR, weights)))


def activation_bytes_per_token(config, element_size: int) -> int:
    """What one token's activations kept for the backward cost across the decoder, estimated for a
    Llama-style block (norms, q/k/v/o, the residual stream, the gated MLP's four intermediate
    tensors): 16 x hidden + 4 x intermediate values per layer."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return config.num_hidden_layers * (16 * config.hidden_size + 4 * intermediate) * element_size
