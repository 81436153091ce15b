"""The PPO losses, one small function each, over (batch, response_length) tensors with a response mask."""
from __future__ import annotations

import torch

from .advantages import masked_mean
from .kl import kl_estimate

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """One loss from per-token terms. token_mean: every response token weighs the same (PPO, DAPO); seq_mean_token_sum:
    each sequence's sum, averaged over sequences (Dr. GRPO: no length normalisation); seq_mean_token_mean: each
    sequence's mean, averaged (GRPO's original, which weighs a short response's tokens more: a length bias)."""
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    sums = (per_token * mask).sum(dim=1)
    if mode == "seq_mean_token_sum":
        return sums.mean()
    if mode == "seq_mean_token_mean":
        return (sums / mask.sum(dim=1).clamp(min=1)).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def truncated_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling for a rollout engine whose numbers differ from the training model's: per token
    min(π_old / π_rollout, cap), where π_old is the training actor's probability of the token when the rollout was
    scored and π_rollout the engine's, which actually sampled it (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"). A constant: no gradient flows through it."""
    return torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap).detach()


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float, weights: torch.Tensor | None = None, aggregation: str = "token_mean") -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) per response token, ρ = π/π_old, each token's term times
    ``weights`` when given (truncated_is_weights), aggregated as ``aggregation`` says. Diagnostics: clipfrac (share of
    tokens where clipping binds) and approx_kl = mean ½(log ρ)²."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.max(unclipped, clipped)
    loss = aggregate(per_token * weights if weights is not None else per_token, mask, aggregation)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(0.5 * log_ratio**2, mask))}
    return loss, stats


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str,
            aggregation: str = "token_mean") -> torch.Tensor:
    """The KL to the reference as a loss term on the policy (``kl_in: loss``, as GRPO has it), instead of a penalty
    inside the per-token reward; the caller weighs it by β."""
    return aggregate(kl_estimate(logprobs, ref_logprobs, estimator), mask, aggregation)


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
