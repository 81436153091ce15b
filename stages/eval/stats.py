"""The statistics of a comparison, as pure functions over (prompts, samples) score arrays. Confidence
intervals are percentile bootstraps that resample *prompts* (a prompt's samples stay together), because
samples of one prompt are not independent of each other."""
from __future__ import annotations

import numpy as np


def _prompt_resamples(num_prompts: int, rounds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_prompts, size=(rounds, num_prompts))


def mean_with_ci(scores: np.ndarray, rounds: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a (prompts, samples) array and its bootstrap CI."""
    scores = np.asarray(scores, dtype=np.float64)
    per_prompt = scores.mean(axis=1)
    means = per_prompt[_prompt_resamples(len(per_prompt), rounds, seed)].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    return float(per_prompt.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def win_outcomes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a's response scores higher than b's on the same prompt and sample index, 0 lower, 0.5 a tie."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a > b) + 0.5 * (a == b)


def win_rate_with_ci(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    return mean_with_ci(win_outcomes(a, b), rounds, seed, level)
