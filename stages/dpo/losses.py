"""DPO's losses: pure functions of the policy's and the reference's summed response log-probabilities of each pair.

With Δ = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) (chosen minus rejected log-ratio):
- ``sigmoid`` (DPO, Rafailov et al. 2023): −log σ(βΔ); with ``label_smoothing`` ε, cDPO's
  −(1 − ε) log σ(βΔ) − ε log σ(−βΔ) (the label is assumed wrong with probability ε);
- ``ipo`` (Azar et al. 2023): (Δ̄ − 1/(2β))², Δ̄ the log-ratios averaged per response token, as TRL and the IPO
  authors compute it (a summed Δ would make the squared loss grow with length);
- ``hinge`` (SLiC, Zhao et al. 2023): max(0, 1 − βΔ).
A pair marked as a tie (collect's exports, a ``tie: true`` record) has the label p = ½ instead of 1, as in the reward
model: sigmoid −½ log σ(βΔ) − ½ log σ(−βΔ), hinge ½ max(0, 1 − βΔ) + ½ max(0, 1 + βΔ), ipo Δ̄² — each smallest at
Δ = 0 (neither response preferred). The implicit rewards are β times each response's log-ratio; an SFT term on the
chosen response (``rpo_alpha``, RPO) is the mean negative log-likelihood of its tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ties: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss (shape [pairs]). ``*_logps``: summed log-probs of each response; ``*_lengths``: its token
    counts, which ``ipo`` needs; ``ties``: True where the pair is a tie (label ½)."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    tie = torch.zeros_like(chosen_ratio, dtype=torch.bool) if ties is None else ties.to(chosen_ratio.device).bool()
    if loss_type == "sigmoid":
        delta = beta * (chosen_ratio - rejected_ratio)
        eps = torch.where(tie, torch.full_like(delta, 0.5), torch.full_like(delta, label_smoothing))
        return -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
    if loss_type == "hinge":
        delta = beta * (chosen_ratio - rejected_ratio)
        return torch.where(tie, 0.5 * torch.relu(1 - delta) + 0.5 * torch.relu(1 + delta), torch.relu(1 - delta))
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo averages the log-ratios per token: give chosen_lengths and rejected_lengths")
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        return (delta - torch.where(tie, torch.zeros_like(delta), torch.full_like(delta, 1 / (2 * beta)))) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}; one of {', '.join(LOSSES)}")


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """β (log π(y|x) − log π_ref(y|x)), detached: what DPO's policy implicitly scores a response."""
    return beta * (logps - ref_logps).detach()


def chosen_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RPO's SFT term: the mean negative log-likelihood of the chosen responses' tokens (``mask`` marks them)."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def pair_metrics(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                 ref_rejected_logps: torch.Tensor, beta: float) -> dict[str, float]:
    """The per-batch numbers TRL's DPOTrainer logs, under its names (means over the pairs)."""
    chosen = implicit_rewards(chosen_logps, ref_chosen_logps, beta)
    rejected = implicit_rewards(rejected_logps, ref_rejected_logps, beta)
    return {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float((chosen - rejected).mean()), "rewards/accuracies": float((chosen > rejected).float().mean()),
            "logps/chosen": float(chosen_logps.detach().mean()), "logps/rejected": float(rejected_logps.detach().mean())}
