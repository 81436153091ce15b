"""Attention-mask helpers shared by the reward model, PPO's rollouts and its advantage math."""
from __future__ import annotations

import torch


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended (mask 1) position of each row, whatever the padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the attended tokens, so a left-padded row gets the positions of the same text unpadded."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
