"""KL against the reference policy: per-token estimators and the KL-coefficient controllers.

The estimators use the sampled tokens' log-probabilities under the policy (``logprobs``) and the reference
(``ref_logprobs``); with samples from the policy, k1 is unbiased but can be negative per token, k3 is
unbiased and always >= 0 with lower variance, k2 = ½ (log r)² is biased but >= 0 and low-variance, and its gradient
as a loss is that of the true KL's for on-policy samples (Schulman, "Approximating KL divergence", 2020).
"""
from __future__ import annotations

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log π(a|s) − log π_ref(a|s)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """½ (log π(a|s) − log π_ref(a|s))²."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(r − 1) − log r with r = π_ref / π."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r} ({', '.join(KL_ESTIMATORS)})")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


class FixedKLController:
    def __init__(self, beta: float):
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): move β towards the KL target, proportionally and clipped:
    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n / horizon)."""

    def __init__(self, init_beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = init_beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]
