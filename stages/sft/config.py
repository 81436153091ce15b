"""The SFT stage's keys: the shared model, data and backbone keys, and the Trainer keys it honors (the common ones,
eval and best-model keys, label smoothing and NEFTune)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from stages.common.config import (EVAL_TRAINER_KEYS, HONORED_TRAINER_KEYS, BackboneArguments, DataArguments, ModelArguments,
                                  TrainArguments)


@dataclass
class SFTTrainArguments(TrainArguments):
    honored: ClassVar[frozenset[str]] = HONORED_TRAINER_KEYS | EVAL_TRAINER_KEYS | {"label_smoothing_factor", "neftune_noise_alpha"}
    eval_metrics: ClassVar[tuple[str, ...]] = ("loss", "perplexity")


ARGUMENTS = (ModelArguments, DataArguments, BackboneArguments, SFTTrainArguments)
