"""Generation and per-token log-probs for PPO: left-padded prompts, sampled responses cut at EOS, and the
(prompt + response) sequence a forward pass scores.

Layout of a rollout row, width P + R:   [pad ... pad | prompt tokens | response tokens, EOS | pad ... pad]
Positions come from the attention mask, so a left-padded row gets the same position ids (and log-probs)
as the same text unpadded. The logit that predicts response token j sits at column P - 1 + j.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.common.masks import position_ids_from_mask


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


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
    """log softmax(logits / T) at the sampled tokens: the distribution the sampler actually drew from."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def generation_config(ppo_args, tokenizer, greedy: bool = False):
    """Explicit settings, so nothing comes from a model's own generation_config (whose top_k is often 50)."""
    from transformers import GenerationConfig

    sample = not greedy and ppo_args.temperature > 0
    return GenerationConfig(
        do_sample=sample, temperature=ppo_args.temperature if sample else 1.0, top_p=ppo_args.top_p if sample else 1.0,
        top_k=ppo_args.top_k if sample else 0, max_new_tokens=ppo_args.max_new_tokens, min_new_tokens=1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config) -> torch.Tensor:
    """Batched sampling with the KV cache; returns the response tokens (B, R), padded after EOS."""
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    response = out[:, prompt_ids.shape[1]:]
    if response.shape[1] == 0:  # cannot happen with min_new_tokens=1, but keep shapes valid
        response = torch.full((len(prompt_ids), 1), config.eos_token_id, dtype=torch.long, device=prompt_ids.device)
    return response
