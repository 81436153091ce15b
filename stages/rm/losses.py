"""Reward-model losses, as pure functions of per-pair rewards."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       tie: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair −log σ(r⁺ − r⁻ − margin): the negative log-likelihood of the label under Bradley-Terry, asking
    for a gap of at least ``margin`` (Llama 2's margin loss) when pairs carry one. A ``tie`` pair's label is p = 0.5:
    −½ log σ(r⁺ − r⁻) − ½ log σ(r⁻ − r⁺), smallest when the two rewards are equal (no margin applies)."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if tie is None or not bool(tie.any()):
        return loss
    gap = chosen - rejected
    return torch.where(tie, -0.5 * (F.logsigmoid(gap) + F.logsigmoid(-gap)), loss)


def centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair (r⁺ + r⁻)²: keeps rewards centered at zero, which the Bradley-Terry loss leaves free
    (Eisenstein et al. 2023, "Helping or herding?")."""
    return (chosen + rejected) ** 2
