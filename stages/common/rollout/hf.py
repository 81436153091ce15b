"""The ``hf`` rollout engine: transformers' ``generate`` on the policy itself, ``batch_size`` rows per call."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable

import torch

from ..generation import generate, generation_config, left_pad, response_mask
from ..seeds import EVAL_BATCH, derive_seed
from .base import Rollouts


class HFEngine:
    """``policy``: the model, or a callable returning a context that yields it (PPO's actor, gathered under ZeRO-3 for the
    whole call). Nothing to load: it generates with the policy's current weights."""

    name = "hf"

    def __init__(self, policy, tokenizer, sampling, batch_size: int, device, model_defaults: bool = False):
        self.policy: Callable[[], ContextManager] = policy if callable(policy) and not isinstance(policy, torch.nn.Module) \
            else (lambda: nullcontext(policy))
        self.tokenizer, self.sampling, self.batch_size, self.device = tokenizer, sampling, batch_size, device
        self.model_defaults = model_defaults

    def load_weights(self, weights: Iterable) -> None:
        pass

    def sleep(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int = 1, seed: int | None = None, greedy: bool = False) -> Rollouts:
        """Rows are the prompts each repeated n times, ``batch_size`` at a time; with ``seed``, batch b is drawn after
        seeding with a seed derived from (seed, b), so that every model given the same seed sees the same random numbers."""
        rows = [p for p in prompts for _ in range(n)]
        config = generation_config(self.sampling, self.tokenizer, greedy=greedy or self.sampling.temperature <= 0)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        responses: list[list[int]] = []
        with self.policy() as model:
            for b, start in enumerate(range(0, len(rows), self.batch_size)):
                ids, mask = left_pad(rows[start : start + self.batch_size], pad)
                if seed is not None:
                    torch.manual_seed(derive_seed(seed, EVAL_BATCH, b))
                out = generate(model, ids.to(self.device), mask.to(self.device), config, model_defaults=self.model_defaults).cpu()
                keep, _ = response_mask(out, eos)
                responses += [row[m.bool()].tolist() for row, m in zip(out, keep)]
        return Rollouts(responses)
