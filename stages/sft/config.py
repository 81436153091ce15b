"""The SFT stage's keys: the shared model, data, backbone and training keys (it adds none of its own)."""
from __future__ import annotations

from stages.common.config import BackboneArguments, DataArguments, ModelArguments, TrainArguments

ARGUMENTS = (ModelArguments, DataArguments, BackboneArguments, TrainArguments)
