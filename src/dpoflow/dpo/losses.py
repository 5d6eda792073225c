"""The DPO loss family: pure functions of sequence log-probabilities. No model, data or config here.

Notation (Rafailov et al. 2023, eq. 7): for a pair (x, y_w, y_l) and a frozen reference π_ref,

    log-ratio_w = log π_θ(y_w|x) − log π_ref(y_w|x)      log-ratio_l likewise for y_l
    h = log-ratio_w − log-ratio_l
    implicit rewards r_w = β·log-ratio_w, r_l = β·log-ratio_l   (eq. 5, up to the partition function)

log π(y|x) is the SUM of the completion's token log-probs (prompt masked), as in the paper and TRL.

Loss types (per example, before the batch mean):
    sigmoid  −log σ(β·h)                                         (DPO, eq. 7)
    cdpo     −(1−ε)·log σ(β·h) − ε·log σ(−β·h)                   (conservative DPO, label smoothing ε)
    robust   (−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1−2ε)        (Chowdhury et al. 2024, unbiased under noise ε)
    hinge    relu(1 − β·h)                                       (SLiC, Zhao et al. 2023)
    ipo      (h̄ − 1/(2β))²  with h̄ from length-averaged log-ratios, as TRL does (Azar et al. 2023, eq. 17)

Worked example used by the tests: β=0.1, policy (−10, −14), reference (−12, −12):
    log-ratios = 2 and −2, h = 4, β·h = 0.4
    sigmoid = −log σ(0.4) = 0.513015,  hinge = 1 − 0.4 = 0.6,  rewards = (0.2, −0.2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses and implicit rewards, each of shape (B,).

    Rewards are β·log-ratios of the summed log-probs for every loss type (TRL logs the same), so
    `rewards/*` mean the same thing whichever loss trained the model.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo: length-averaged log-ratios, target margin 1/(2β)
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
        h_avg = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (h_avg - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-example NLL of the chosen completion, averaged over its tokens (RPO's extra term, Pang et
    al. 2024, weighted by `dpo.rpo_alpha`). TRL's `sft` loss type averages over all chosen tokens of
    the batch instead: the same quantity when completions have equal lengths, otherwise long
    completions weigh more there."""
    return -policy_chosen_logps / chosen_lengths
