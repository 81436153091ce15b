"""The PPO losses, one small function each, over (batch, response_length) tensors with a response mask."""
from __future__ import annotations

import torch

from .advantages import masked_mean


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: mean over response tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old.
    Diagnostics: clipfrac (share of tokens where clipping binds) and approx_kl = mean ½(log ρ)²."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * log_ratio**2, mask))}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float | None) -> tuple[torch.Tensor, dict[str, float]]:
    """½ · mean max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε_v); unclipped when ε_v is None."""
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        loss = 0.5 * masked_mean(unclipped, mask)
        return loss, {"vf_clipfrac": 0.0}
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, {"vf_clipfrac": float(masked_mean((clipped > unclipped).float(), mask))}
