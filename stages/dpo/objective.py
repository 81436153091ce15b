"""DPO's objective for the shared training loop (stages/common/loop.fit): one forward of the policy over both sides of
each pair, the reference's log-probs (precomputed, or one no-grad forward), the loss of stages/dpo/losses.py, and TRL's
metrics as sums over pairs (the loop divides by the pair count)."""
from __future__ import annotations

from typing import Callable

import torch

from stages.common.generation import token_logprobs
from stages.common.lm import align_logits

from .losses import chosen_nll, dpo_loss, pair_metrics


def response_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's response tokens, per-token log-probs masked to them); logits predict the next token."""
    logits = align_logits(logits, input_ids.shape[1])[:, :-1]
    mask = response_mask[:, 1:].to(logits.dtype if logits.is_floating_point() else torch.float32).float()
    per_token = token_logprobs(logits, input_ids[:, 1:], 1.0) * mask
    return per_token.sum(dim=1), per_token


class DPOObjective:
    """``reference(input_ids, attention_mask) -> logits`` runs the frozen reference (under no_grad here)."""

    def __init__(self, dpo_args, reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.args, self.reference = dpo_args, reference

    def count(self, batch: dict) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def reference_logps(self, batch: dict, device) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].to(device, torch.float32)
        with torch.no_grad():
            logits = self.reference(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            return response_logps(logits, batch["input_ids"].to(device), batch["response_mask"].to(device))[0]

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        input_ids, attention_mask, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
        logps, per_token = response_logps(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits, input_ids, mask)
        ref = self.reference_logps(batch, device)
        pairs = input_ids.shape[0] // 2
        lengths = mask[:, 1:].sum(dim=1).float()
        losses = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], self.args.beta, self.args.loss_type,
                          self.args.label_smoothing, lengths[:pairs], lengths[pairs:], batch.get("tie"))
        loss = losses.sum()
        if self.args.rpo_alpha:  # per pair: the mean NLL of its chosen tokens
            loss = loss + self.args.rpo_alpha * sum(chosen_nll(per_token[i], mask[i, 1:].float()) for i in range(pairs))
        metrics = pair_metrics(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], self.args.beta)
        return loss, {key: value * pairs for key, value in metrics.items()}
