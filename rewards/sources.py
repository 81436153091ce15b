"""The reward PPO optimizes and eval judges with: one or more sources, summed with weights.

A source is written as
  a directory      a reward model (full, exported or adapter) from the RM stage; normalized with its
                   reward_stats.json when ``normalize`` is on
  rule:NAME[:ARG]  a programmatic rule (rewards/rules.py: rule:keyword:please, or a rule a package registers,
                   such as the demo's rule:gold_judge)
  http(s)://URL    a reward server (rewards/remote.py, rewards/server.py)

Each source scores (prompt messages, response text) pairs; ``Reward.__call__`` returns the weighted sum of
the raw scores and the weighted sum of the normalized scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rewards.model import DEFAULT_BATCH_SIZE
from stages.common.errors import ConfigError, missing_path


@dataclass
class RewardSourceArguments:
    """How reward sources score, for PPO's ``reward_model`` and eval's ``judges`` alike."""

    reward_max_length: int | None = field(default=None, metadata={
        "help": "Tokens of chat_template(prompt + response) a reward model scores (longer ones are right-truncated); "
                "None = the max_length the reward model was trained with (its tristage_config.yaml), else 1024."})
    remote_timeout: float = field(default=60.0, metadata={"help": "Seconds a reward server may take to answer one request."})
    remote_retries: int = field(default=3, metadata={"help": "Attempts per request to a reward server before the run stops."})
    remote_batch_size: int = field(default=64, metadata={"help": "Responses sent to a reward server per request."})

    def __post_init__(self):
        if self.reward_max_length is not None and self.reward_max_length < 1:
            raise ConfigError("must be >= 1 (or unset: the reward model's own max_length)", key="reward_max_length")
        if self.remote_timeout <= 0:
            raise ConfigError("must be > 0 seconds", key="remote_timeout")
        if self.remote_retries < 1:
            raise ConfigError("must be >= 1", key="remote_retries")
        if self.remote_batch_size < 1:
            raise ConfigError("must be >= 1", key="remote_batch_size")


def last_user_text(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def is_rule(spec: str) -> bool:
    return spec.startswith("rule:")


def is_remote(spec: str) -> bool:
    return spec.startswith("http://") or spec.startswith("https://")


def is_model_source(spec: str) -> bool:
    return not (is_rule(spec) or is_remote(spec))


class RuleSource:
    def __init__(self, spec: str, key: str = "reward_model"):
        from rewards.rules import find_rule, known_rules

        name, _, arg = spec[len("rule:"):].partition(":")
        self.rule = find_rule(name, arg)
        if self.rule is None:
            raise ConfigError(f"unknown rule {spec!r} (known: {', '.join(known_rules())})", key=key)
        self.spec = spec

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> tuple[list[float], list[float]]:
        scores = [float(self.rule(last_user_text(p), r)) for p, r in zip(prompts, responses)]
        return scores, scores


class RemoteSource:
    def __init__(self, url: str, settings: RewardSourceArguments):
        from rewards.remote import RemoteReward

        self.client = RemoteReward(url, settings.remote_timeout, settings.remote_retries, settings.remote_batch_size)
        self.spec = url

    def __call__(self, prompts, responses):
        scores = self.client(prompts, responses)
        return scores, scores


class ModelSource:
    """A reward model through ``RewardScorer`` (chat template, reward at the last real token). ``model`` may
    be a DeepSpeed inference engine (ZeRO-3) or a shared-backbone view; by default the directory is loaded."""

    def __init__(self, path: str, normalize: bool, max_length: int | None, batch_size: int, model=None, tokenizer=None,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        from rewards.model import RewardScorer, RewardStats

        if not Path(path).is_dir():
            raise ConfigError(f"{path!r} is not a reward model directory (nor rule:NAME or an http URL)", key="reward_model")
        self.scorer = RewardScorer(path, normalize=False, max_length=max_length, batch_size=batch_size, model=model, tokenizer=tokenizer,
                                   dtype=dtype, device=device)
        self.stats = RewardStats.load(path) if normalize else None
        if normalize and self.stats is None:
            raise ConfigError(f"{path} has no reward_stats.json to normalize with; set reward_normalize: false", key="reward_normalize")
        self.spec = path

    def __call__(self, prompts, responses):
        raw = self.scorer.score(prompts, responses)
        if self.stats is None:
            return raw, raw
        return raw, self.stats.normalize(torch.tensor(raw, dtype=torch.float64)).tolist()


def check_specs(specs: list[str] | None, key: str, allow_missing: bool = False) -> list[str]:
    """Before anything loads: every spec is a known rule, an http(s) URL or an existing directory. With
    ``allow_missing`` (a dry run, or a pipeline whose RM stage has not run yet) missing directories are
    returned instead of refused."""
    if not specs:
        raise ConfigError("no reward given: a reward model directory, rule:NAME or an http(s) URL", key=key)
    missing = []
    for spec in specs:
        if is_rule(spec):
            RuleSource(spec, key=key)  # raises for an unknown rule
        elif is_model_source(spec) and not Path(spec).is_dir():
            if not allow_missing:
                raise missing_path(spec, key) or ConfigError(f"{spec!r} is neither a reward model directory, rule:NAME nor an "
                                                             "http(s) URL", key=key)
            missing.append(spec)
    return missing


def build_source(spec: str, normalize: bool, batch_size: int = DEFAULT_BATCH_SIZE, settings: RewardSourceArguments | None = None,
                 model=None, tokenizer=None, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
    """One source; a reward model is ``model`` when given, else loaded from ``spec`` in ``dtype`` on ``device``."""
    settings = settings or RewardSourceArguments()
    if is_rule(spec):
        return RuleSource(spec)
    if is_remote(spec):
        return RemoteSource(spec, settings)
    return ModelSource(spec, normalize, settings.reward_max_length, batch_size, model=model, tokenizer=tokenizer, dtype=dtype,
                       device=device)


class Reward:
    def __init__(self, sources: list[Callable], weights: list[float] | None = None):
        weights = weights or [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ConfigError(f"{len(weights)} weight(s) for {len(sources)} reward source(s)", key="reward_weights")
        self.sources, self.weights = sources, weights

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, normalized): each the weighted sum over the sources, float64, one value per response."""
        raw = torch.zeros(len(responses), dtype=torch.float64)
        normalized = torch.zeros(len(responses), dtype=torch.float64)
        for source, weight in zip(self.sources, self.weights):
            source_raw, source_normalized = source(prompts, responses)
            raw += weight * torch.tensor(source_raw, dtype=torch.float64)
            normalized += weight * torch.tensor(source_normalized, dtype=torch.float64)
        return raw, normalized


def build_reward(specs: list[str], weights: list[float] | None = None, normalize: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                 settings: RewardSourceArguments | None = None, models: dict | None = None, tokenizer=None,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Reward:
    """``batch_size``: responses a reward model scores per forward. ``models`` maps a reward-model spec to an already
    built model (engine or shared view) to use for it; the others load in ``dtype`` on ``device``."""
    check_specs(specs, key="reward_model")
    models = models or {}
    return Reward([build_source(s, normalize, batch_size, settings, model=models.get(s), tokenizer=tokenizer if s in models else None,
                                dtype=dtype, device=device) for s in specs], weights)
