"""The rollout engine: what samples responses for PPO, eval and collect, behind one interface.

``hf``: ``model.generate`` on the policy itself (the default; nothing to install). ``vllm``: a vLLM engine in the
same process (one per process: each process samples its own rows), which starts with no weights of its own and is
given the policy's weights before every rollout (``load_weights``, streamed module by module from the training
model: full weights, LoRA stacks merged, QLoRA dequantized, ZeRO-3 gathered one block at a time). Both draw with
exactly the sampling keys (``SamplingArguments``) and nothing from a model's generation_config.json.
"""
from __future__ import annotations

import torch

from .base import ENGINES, RolloutArguments, RolloutEngine, Rollouts, refuse_unsupported

__all__ = ["ENGINES", "RolloutArguments", "RolloutEngine", "Rollouts", "engine_for", "refuse_unsupported"]


def engine_for(args: RolloutArguments, model, model_path: str, tokenizer, sampling, batch_size: int, device, dtype: torch.dtype,
               rows: int, seed: int, previous=None, model_defaults: bool = False) -> RolloutEngine:
    """An engine sampling from ``model`` as it is now (eval and collect: one model after another). ``previous``: the
    engine made for the model before, reused when its architecture and shape are the same (vLLM: loaded with this
    model's weights, so the engine starts once per run)."""
    if args.rollout_engine == "hf":
        from .hf import HFEngine

        return HFEngine(model, tokenizer, sampling, batch_size, device, model_defaults=model_defaults)
    from ..loading import adapter_base_path
    from .vllm_engine import VLLMEngine, architecture
    from .weights import policy_weights

    base = adapter_base_path(model_path) or model_path
    if previous is None or getattr(previous, "architecture", None) != architecture(base):
        del previous
        if device.type == "cuda":
            torch.cuda.set_device(device)
        previous = VLLMEngine(base, tokenizer, sampling, args, dtype, rows, seed)
    previous.load_weights(policy_weights(model))
    return previous
