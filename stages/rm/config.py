"""The reward-model stage's own keys; the rest are the shared model, data, backbone and training keys."""
from __future__ import annotations

from dataclasses import dataclass, field

from typing import ClassVar

from stages.common.config import (EVAL_TRAINER_KEYS, HONORED_TRAINER_KEYS, BackboneArguments, DataArguments, ModelArguments,
                                  TrainArguments)


@dataclass
class RewardArguments:
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "Weight of (r_chosen + r_rejected)^2 in the loss, keeping rewards centered at 0 "
                                       "(Eisenstein et al. 2023); 0 = off."})
    use_margin: bool = field(default=True, metadata={"help": "Use each pair's margin field in -log sigmoid(r+ - r- - margin)."})


@dataclass
class RMTrainArguments(TrainArguments):
    honored: ClassVar[frozenset[str]] = HONORED_TRAINER_KEYS | EVAL_TRAINER_KEYS
    eval_metrics: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "reward_gap")


ARGUMENTS = (ModelArguments, DataArguments, BackboneArguments, RewardArguments, RMTrainArguments)
