"""The DPO stage's own keys; the rest are the shared model, data, backbone and training keys."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from stages.common.config import (EVAL_TRAINER_KEYS, HONORED_TRAINER_KEYS, BackboneArguments, DataArguments, ModelArguments,
                                  TrainArguments)
from stages.common.errors import ConfigError

from .losses import LOSSES


@dataclass
class DPOArguments:
    """Direct preference optimization (stages/dpo): the policy learns from preference pairs against a frozen reference,
    with no reward model and no rollouts. Formulas in stages/dpo/losses.py."""

    beta: float = field(default=0.1, metadata={"help": "How far the policy may move from the reference (the implicit reward's scale)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo (IPO, log-ratios averaged per token) or hinge (SLiC)."})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "sigmoid only: the probability that a pair's label is flipped (cDPO); 0 = off, below 0.5."})
    rpo_alpha: float = field(default=0.0, metadata={"help": "Weight of an SFT term on the chosen response (RPO); 0 = off."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The frozen reference; None = the starting model (for lora/qlora: the same model with the trained adapter off, "
                "no second copy in memory; an SFT adapter the policy stacks on stays on)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "One pass of the reference over the train and eval pairs before training, then no reference forward per step "
                "(a separate reference model is released after the pass)."})

    def __post_init__(self):
        if self.loss_type not in LOSSES:
            raise ConfigError(f"must be one of {', '.join(LOSSES)}, not {self.loss_type!r}", key="loss_type")
        if self.beta <= 0:
            raise ConfigError("must be > 0", key="beta")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("must be in [0, 0.5)", key="label_smoothing")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"applies to the sigmoid loss; loss_type is {self.loss_type}", key="label_smoothing")
        if self.rpo_alpha < 0:
            raise ConfigError("must be >= 0", key="rpo_alpha")


@dataclass
class DPOTrainArguments(TrainArguments):
    honored: ClassVar[frozenset[str]] = HONORED_TRAINER_KEYS | EVAL_TRAINER_KEYS
    eval_metrics: ClassVar[tuple[str, ...]] = ("loss", "rewards/accuracies", "rewards/margins")


ARGUMENTS = (ModelArguments, DataArguments, BackboneArguments, DPOArguments, DPOTrainArguments)
