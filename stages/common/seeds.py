"""How every random stream of a run gets its seed from the run's ``seed`` and the stream's counters.

A stream's seed is ``seed * strides[0] + counter_1 * strides[1] + ...``. Each stream has its own strides so
that the order of a run's prompts, of its minibatches and of its epochs do not share seeds. The strides are
the ones tristage has always used, kept so that a seed reproduces earlier runs; the two PPO streams use
primes far apart, so neighbouring seeds and counters do not collide in practice.
"""
from __future__ import annotations

EPOCH_ORDER = (1, 1)  # SFT/RM: the shuffle of epoch e is seeded with seed + e
PROMPT_ORDER = (7919, 1)  # PPO: the permutation of all prompts for lap l (one pass over them)
MINIBATCH_ORDER = (100_003, 101, 1)  # PPO: the minibatch order of (iteration, ppo epoch)
ROLLOUT_SAMPLES = (15_485_863, 1009, 1)  # PPO with a vLLM engine: the draws of (iteration, rank)
TOP_UP_PROMPTS = (49_979_687, 101, 1)  # PPO dynamic sampling: the prompts of (iteration, extra round)
TOP_UP_SAMPLES = (32_452_843, 1009, 101, 1)  # PPO dynamic sampling with a vLLM engine: the draws of (iteration, rank, round)
EVAL_BATCH = (1, 1)  # eval: batch b of every model is sampled after seeding with seed + b (common random numbers)


def derive_seed(seed: int, strides: tuple[int, ...], *counters: int) -> int:
    """The seed of one draw of a stream: ``seed * strides[0] + sum(counter_i * strides[i])``."""
    if len(counters) != len(strides) - 1:
        raise ValueError(f"this stream takes {len(strides) - 1} counter(s), got {len(counters)}")
    return seed * strides[0] + sum(count * stride for count, stride in zip(counters, strides[1:]))
