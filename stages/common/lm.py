"""Causal-LM helpers shared by the stages."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def align_logits(logits: torch.Tensor, length: int) -> torch.Tensor:
    """Drop the positions of virtual tokens that peft's P-tuning v1 prepends to the input."""
    return logits[:, -length:] if logits.shape[1] > length else logits


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed next-token negative log-likelihood over the positions whose label is not IGNORE_INDEX; with
    ``label_smoothing`` e, the target puts 1 - e on the label and e spread over the vocabulary (as HF's LabelSmoother)."""
    logits = align_logits(logits, labels.shape[1])[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)


def count_label_tokens(labels: torch.Tensor) -> float:
    return float((labels[:, 1:] != IGNORE_INDEX).sum())


class CausalLMObjective:
    """SFT: mean next-token loss over response tokens (labels are IGNORE_INDEX elsewhere). ``label_smoothing`` applies
    while training; eval loss and perplexity stay the plain likelihood."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def count(self, batch: dict) -> float:
        return count_label_tokens(batch["labels"])

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        # use_cache=False matters beyond memory: with a cache transformers skips the packed-sequence check
        # and packed examples would attend to each other.
        logits = model(**inputs, use_cache=False).logits
        smoothing = self.label_smoothing if model.training else 0.0
        return token_nll_sum(logits, batch["labels"].to(device), smoothing), {}
