"""The reward PPO and eval optimize or judge with: one or more sources, summed with weights.

A source is written as
  a directory      a reward model (full, exported or adapter) from the RM stage; normalized with its
                   reward_stats.json when ``normalize`` is on
  rule:NAME[:ARG]  a programmatic rule from rewards/rules.py (rule:gold_judge, rule:keyword:please)
  http(s)://URL    a reward server (rewards/remote.py)

Each source scores (prompt messages, response text) pairs; ``Reward.__call__`` returns the weighted sum of
the raw scores and the weighted sum of the normalized scores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from stages.common.errors import ConfigError


def last_user_text(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


class RuleSource:
    def __init__(self, spec: str):
        from rewards.rules import RULE_FACTORIES, RULES

        name, _, arg = spec[len("rule:"):].partition(":")
        if name in RULES and not arg:
            self.rule = RULES[name]
        elif name in RULE_FACTORIES and arg:
            self.rule = RULE_FACTORIES[name](arg)
        else:
            known = ", ".join([*RULES, *(f"{k}:ARG" for k in RULE_FACTORIES)])
            raise ConfigError(f"unknown rule {spec!r} (known: {known})", key="reward_model")
        self.spec = spec

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> tuple[list[float], list[float]]:
        scores = [float(self.rule(last_user_text(p), r)) for p, r in zip(prompts, responses)]
        return scores, scores


class RemoteSource:
    def __init__(self, url: str):
        from rewards.remote import RemoteReward

        self.client, self.spec = RemoteReward(url), url

    def __call__(self, prompts, responses):
        scores = self.client(prompts, responses)
        return scores, scores


class ModelSource:
    """A reward model through ``RewardScorer`` (chat template, reward at the last real token). ``model`` may
    be a DeepSpeed inference engine (ZeRO-3) or a shared-backbone view; by default the directory is loaded."""

    def __init__(self, path: str, normalize: bool, max_length: int = 1024, batch_size: int = 16, model=None, tokenizer=None):
        from rewards.model import RewardScorer, RewardStats

        if not Path(path).is_dir():
            raise ConfigError(f"{path!r} is not a reward model directory (nor rule:NAME or an http URL)", key="reward_model")
        self.scorer = RewardScorer(path, normalize=False, max_length=max_length, batch_size=batch_size, model=model, tokenizer=tokenizer)
        self.stats = RewardStats.load(path) if normalize else None
        if normalize and self.stats is None:
            raise ConfigError(f"{path} has no reward_stats.json to normalize with; set reward_normalize: false", key="reward_normalize")
        self.spec = path

    def __call__(self, prompts, responses):
        raw = self.scorer.score(prompts, responses)
        if self.stats is None:
            return raw, raw
        return raw, self.stats.normalize(torch.tensor(raw, dtype=torch.float64)).tolist()


def is_model_source(spec: str) -> bool:
    return not (spec.startswith("rule:") or spec.startswith("http://") or spec.startswith("https://"))


def build_source(spec: str, normalize: bool, max_length: int = 1024, batch_size: int = 16, model=None, tokenizer=None):
    if spec.startswith("rule:"):
        return RuleSource(spec)
    if spec.startswith("http://") or spec.startswith("https://"):
        return RemoteSource(spec)
    return ModelSource(spec, normalize, max_length, batch_size, model=model, tokenizer=tokenizer)


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


def build_reward(specs: list[str], weights: list[float] | None = None, normalize: bool = True, max_length: int = 1024,
                 batch_size: int = 16, models: dict | None = None, tokenizer=None) -> Reward:
    """``models`` maps a reward-model spec to an already built model (engine or shared view) to use for it."""
    if not specs:
        raise ConfigError("no reward given: a reward model directory, rule:NAME or an http(s) URL", key="reward_model")
    models = models or {}
    return Reward([build_source(s, normalize, max_length, batch_size, model=models.get(s), tokenizer=tokenizer if s in models else None)
                   for s in specs], weights)
