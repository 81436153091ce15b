"""Generation shared by PPO's rollouts, eval and collect: left-padded prompts, sampled responses cut at EOS,
and the (prompt + response) rows a forward pass scores.

Layout of a rollout row, width P + R:   [pad ... pad | prompt tokens | response tokens, EOS | pad ... pad]
Positions come from the attention mask, so a left-padded row gets the same position ids (and log-probs)
as the same text unpadded. The logit that predicts response token j sits at column P - 1 + j.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data.collate import pad_rows
from .errors import ConfigError
from .masks import position_ids_from_mask


@dataclass
class SamplingArguments:
    """How responses are sampled: the same keys for PPO's rollouts, eval and collect. Exactly these settings reach
    the sampler (nothing from a model's own generation_config), and log-probs use the same temperature."""

    max_prompt_length: int = field(default=256, metadata={"help": "Longer prompts are cut from the left (the end is kept)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated at most per response (EOS ends it sooner)."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature; log-probs use logits / temperature too. 0 = greedy (eval only: PPO must sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: the smallest set of tokens with this much probability; 1 = off."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens; 0 = off."})

    def __post_init__(self):
        for key in ("max_prompt_length", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", key=key)
        if self.temperature < 0:
            raise ConfigError("must be >= 0 (0 = greedy)", key="temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError("must be in (0, 1]", key="top_p")
        if self.top_k < 0:
            raise ConfigError("must be >= 0 (0 = off)", key="top_k")


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_rows(sequences, pad_token_id, side="left")


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on response tokens up to and including the first EOS, 0 after; and whether each row ended (EOS seen).
    Works when the pad token is the EOS token too."""
    is_eos = (response_ids == eos_token_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long(), is_eos.bool().any(dim=1)


def join(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, resp_mask: torch.Tensor) -> dict:
    """The model inputs of whole rollout rows."""
    attention_mask = torch.cat([prompt_mask, resp_mask], dim=1)
    return {"input_ids": torch.cat([prompt_ids, response_ids], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask)}


def response_logits(logits: torch.Tensor, response_width: int) -> torch.Tensor:
    """The logits that predict the response tokens (drops P-tuning v1 virtual tokens too, which come first)."""
    return logits[:, -response_width - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the sampled tokens: the distribution the sampler actually drew from. In float32, one
    row at a time, so the (rows x length x vocabulary) logits are never copied to float32 all at once."""
    return torch.stack([F.log_softmax(row.float() / temperature, dim=-1).gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
                        for row, row_tokens in zip(logits, tokens)])


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The entropy of softmax(logits / T) at every position; float32, one row at a time (see token_logprobs)."""
    entropies = []
    for row in logits:
        logprobs = F.log_softmax(row.float() / temperature, dim=-1)
        entropies.append(-(logprobs.exp() * logprobs).sum(dim=-1))
    return torch.stack(entropies)


def generation_config(sampling: SamplingArguments, tokenizer, greedy: bool = False):
    """Exactly our settings. Sampling from logits / T (with top_k, top_p when set) and nothing else: no minimum length
    (an EOS as the first token is an empty response, not a masked-out choice the log-probs would not know about), and,
    with ``generate``, none of a model's own generation_config.json (repetition penalties, n-gram blocking, min_p,
    suppressed tokens: a sampler the log-probs do not describe)."""
    from transformers import GenerationConfig

    sample = not greedy and sampling.temperature > 0
    return GenerationConfig(
        do_sample=sample, temperature=sampling.temperature if sample else 1.0, top_p=sampling.top_p if sample else 1.0,
        top_k=sampling.top_k if sample else 0, max_new_tokens=sampling.max_new_tokens, min_new_tokens=0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )


@contextmanager
def model_defaults_off(model):
    """transformers fills every generation setting we leave unset from the model's generation_config (Qwen2.5-Instruct's
    says repetition_penalty 1.05, top_k 20, top_p 0.8): inside this block the model has the library's neutral one."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft generates through its base
    own = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = own


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config, model_defaults: bool = False,
             scores: list | None = None) -> torch.Tensor:
    """Batched sampling with the KV cache; returns the response tokens (B, R), padded after EOS. ``model_defaults``:
    let the model's generation_config fill what ``config`` leaves unset. ``scores``: append the sampler's processed
    logits of every step (B, V) to this list."""
    extra = {"output_scores": True, "return_dict_in_generate": True} if scores is not None else {}
    with nullcontext() if model_defaults else model_defaults_off(model):
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **extra)
    if scores is not None:
        scores.extend(out.scores)
        out = out.sequences
    response = out[:, prompt_ids.shape[1]:]
    if response.shape[1] == 0:  # generate always returns a token (EOS at least); keep shapes valid all the same
        response = torch.full((len(prompt_ids), 1), config.eos_token_id, dtype=torch.long, device=prompt_ids.device)
    return response


@torch.no_grad()
def sample_responses(engine, tokenizer, prompts: list[dict], samples_per_prompt: int, batch_size: int, seed: int) -> dict:
    """Every prompt x ``samples_per_prompt`` from a rollout engine (stages/common/rollout), the samples of a prompt
    next to each other, drawn from ``seed``; ``prompts`` are rows with ``prompt_ids``. Also returns the rows in
    batches of ``batch_size`` as ``sequence_logprobs`` reads them."""
    rollouts = engine.generate([p["prompt_ids"] for p in prompts], n=samples_per_prompt, seed=seed)
    rows = [p["prompt_ids"] for p in prompts for _ in range(samples_per_prompt)]
    responses, eos = rollouts.response_ids, tokenizer.eos_token_id
    batches = []
    for start in range(0, len(rows), batch_size):
        prompt_batch = left_pad(rows[start : start + batch_size], tokenizer.pad_token_id)
        response, mask = pad_rows(responses[start : start + batch_size], tokenizer.pad_token_id)
        batches.append((prompt_batch, response, mask))
    return {"texts": tokenizer.batch_decode(responses, skip_special_tokens=True), "lengths": [len(r) for r in responses],
            "ended": [bool(r) and r[-1] == eos for r in responses], "batches": batches}


@torch.no_grad()
def sequence_logprobs(model, batches, temperature: float) -> list[float]:
    """Summed log-probs of each sampled response (``sample_responses``' batches) under ``model``, at the sampling
    temperature."""
    temperature = temperature if temperature > 0 else 1.0
    device = next(model.parameters()).device
    totals = []
    for (ids, mask), response, resp_mask in batches:
        inputs = {k: v.to(device) for k, v in join(ids, mask, response, resp_mask).items()}
        logits = response_logits(model(**inputs, logits_to_keep=response.shape[1] + 1).logits, response.shape[1])
        logprobs = token_logprobs(logits, response.to(device), temperature) * resp_mask.to(device)
        totals += logprobs.sum(dim=1).tolist()
    return totals
