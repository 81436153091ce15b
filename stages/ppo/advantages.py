"""Per-token rewards, masked statistics, whitening and the advantage estimators: pure functions over (batch,
response_length) tensors whose ``mask`` is 1 on response tokens (up to and including EOS) and 0 after, and over
(batch,) sequence scores whose rows come in groups of ``n`` samples of one prompt, next to each other.

    gae                     critic values, GAE over KL-shaped per-token rewards (PPO)
    grpo                    (r − group mean) / (group std + ε), or without the division (Dr. GRPO)
    rloo                    r − mean of the prompt's other n − 1 samples
    reinforce_pp            returns of the KL-shaped per-token rewards, whitened over the batch (REINFORCE++)
    reinforce_pp_baseline   the group mean subtracted from r first, then as reinforce_pp
The critic-free ones shape the sequence score (``group_baseline``) and then take returns-to-go of the per-token
rewards (``discounted_returns``), as OpenRLHF does, so that a per-token KL penalty (``kl_in: reward``) reaches every
token."""
from __future__ import annotations

import torch

from stages.common.masks import last_token_index


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """(x − mean) / std over the masked entries; with shift_mean=False the mean is added back (as for rewards,
    whose sign matters). Entries outside the mask are returned as 0. ``reduce`` (a sum over processes, e.g.
    all_reduce_sum) takes mean and variance over every process's entries, from their sum, sum of squares and count."""
    if reduce is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        total, squares, count = reduce([float((values * mask).sum()), float((values**2 * mask).sum()), float(mask.sum())])
        mean_value = total / max(count, 1.0)
        var_value = max(squares / max(count, 1.0) - mean_value**2, 0.0) * count / max(count - 1.0, 1.0)
        mean = torch.tensor(mean_value, dtype=values.dtype, device=values.device)
        var = torch.tensor(var_value, dtype=values.dtype, device=values.device)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """−β·KL on every response token, plus the sequence score at the last response token
    (lm-human-preferences; Ziegler et al. 2019)."""
    rewards = -beta * kl * mask
    rewards[torch.arange(len(scores)), last_token_index(mask)] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens; returns (advantages, returns = advantages + values).
    Positions after the response (mask 0) neither bootstrap nor receive advantage."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns): 1 is a perfect critic, ≤ 0 one no better than a constant."""
    var_returns = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8))


ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")  # need n >= 2 samples per prompt


def group_baseline(scores: torch.Tensor, n: int, estimator: str, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The sequence scores after the estimator's baseline, for rows in consecutive groups of n."""
    if estimator in ("gae", "reinforce_pp"):
        return scores.clone()
    groups = scores.view(-1, n)
    if estimator == "rloo":
        return (groups - (groups.sum(dim=1, keepdim=True) - groups) / (n - 1)).view(-1)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if estimator == "grpo" and scale_by_std:
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    if estimator in ("grpo", "reinforce_pp_baseline"):
        return centered.view(-1)
    raise ValueError(f"unknown advantage estimator {estimator!r}")


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{k≥t} γ^(k−t) r_k over response tokens (REINFORCE's return-to-go; 0 after the response)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def group_stats(scores: torch.Tensor, n: int, eps: float = 1e-6) -> dict[str, float]:
    """Diagnostics of the groups: mean score, mean within-group std, and the share of groups whose scores are all equal
    (they carry no signal for a group estimator)."""
    groups = scores.view(-1, n)
    spread = groups.std(dim=1) if n > 1 else torch.zeros(len(groups))
    return {"group_reward_mean": float(groups.mean()), "group_reward_std": float(spread.mean()),
            "zero_variance_groups": float(((groups.max(dim=1).values - groups.min(dim=1).values) <= eps).float().mean())}
