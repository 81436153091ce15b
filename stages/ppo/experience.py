"""The first half of a PPO iteration (DeepSpeed-Chat's "generate experience" and "compute rewards"):
sample the prompts' responses, score them, and compute everything the update needs — old log-probs,
reference log-probs, values, per-token KL-penalized rewards, advantages and returns. ``update.py`` is the
second half. Every formula is a pure function in kl.py and advantages.py; this file only wires them.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from stages.common.data import pad_rows
from stages.common.distributed import all_reduce_sum, any_rank, process_count
from stages.common.distributed import all_reduce_max
from stages.common.generation import join, left_pad, response_logits, response_mask, token_entropy, token_logprobs

from .advantages import explained_variance, gae, masked_mean, masked_whiten, per_token_rewards
from .kl import kl_estimate
from .losses import truncated_is_weights


@dataclass
class Experience:
    """One rank's rollout: (B, P) prompts, (B, R) responses, and per-token tensors over the responses."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict
    is_weights: torch.Tensor | None = None  # truncated importance weights for the engine's sampling (rollout_is_cap)

    def inputs(self, rows: torch.Tensor) -> dict:
        return join(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows], self.mask[rows])

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _in_chunks(count: int, size: int):
    for start in range(0, count, size):
        yield torch.arange(start, min(start + size, count))


@torch.no_grad()
def make_experience(roles, engine, tokenizer, rows: list[dict], ppo_args, sampling, beta: float, inference_batch: int,
                    device, seed: int | None = None) -> Experience | None:
    """The rollout engine samples every row (hf: ``inference_batch`` rows per generate call, since for small models the
    per-token overhead of ``generate`` dominates; vllm: all at once, drawn from ``seed``); the no-grad passes run
    ``inference_batch`` rows at a time. Returns None (on every rank) when a score, log-prob or value is not finite:
    the iteration is skipped."""
    started = time.time()
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    # 1. Generate.
    rollouts = engine.generate([r["prompt_ids"] for r in rows], n=1, seed=seed)
    engine.sleep()  # vLLM's sleep mode hands the GPU memory back for scoring and the update
    response_ids, _ = pad_rows(rollouts.response_ids, tokenizer.pad_token_id)
    rollout_logprobs = None
    if rollouts.logprobs is not None:
        rollout_logprobs = torch.zeros(response_ids.shape)
        for i, row in enumerate(rollouts.logprobs):
            rollout_logprobs[i, : len(row)] = torch.tensor(row)
    timing = {"started": started, "generated": time.time()}
    return score_rollouts(roles, tokenizer, rows, prompt_ids, prompt_mask, response_ids.to(device), ppo_args, sampling, beta,
                          inference_batch, timing, rollout_logprobs.to(device) if rollout_logprobs is not None else None)


@torch.no_grad()
def score_rollouts(roles, tokenizer, rows: list[dict], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   response_ids: torch.Tensor, ppo_args, sampling, beta: float, inference_batch: int,
                   timing: dict | None = None, rollout_logprobs: torch.Tensor | None = None) -> Experience | None:
    """Everything the update needs from sampled responses: scores, log-probs, values, KL-penalized per-token rewards,
    advantages and returns (DeepSpeed-Chat's "compute rewards"). Whitening uses every rank's rollout, so the result
    does not depend on how many processes share it. ``rollout_logprobs``: the engine's log-probs of the sampled tokens,
    compared with the actor's (``rollout_logprob_diff``); the ratio always uses the actor's own."""
    device = prompt_ids.device
    timing = timing or {"started": time.time(), "generated": time.time()}
    mask, ended = response_mask(response_ids, tokenizer.eos_token_id)

    # 2. Score the decoded responses; the reward model re-renders them through its chat template.
    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(response_ids, mask)], skip_special_tokens=True)
    raw, normalized = roles.reward([r["prompt"] for r in rows], texts)
    scores = normalized.clone()
    if ppo_args.reward_clip > 0:
        scores = scores.clamp(-ppo_args.reward_clip, ppo_args.reward_clip)
    scores -= ppo_args.missing_eos_penalty * (~ended).double().cpu()
    scores = scores.float().to(device)

    # 3. Log-probs of the actor and the reference, values of the critic, batch by batch.
    roles.train(False)
    width = response_ids.shape[1]
    logprobs, ref_logprobs, values, entropy = [], [], [], []
    for chunk in _in_chunks(len(rows), inference_batch):
        inputs = join(prompt_ids[chunk], prompt_mask[chunk], response_ids[chunk], mask[chunk])
        logits = response_logits(roles.actor_logits(inputs, keep=width + 1), width)
        logprobs.append(token_logprobs(logits, response_ids[chunk], sampling.temperature))
        entropy.append(token_entropy(logits, sampling.temperature))
        ref = response_logits(roles.ref_logits(inputs, keep=width + 1), width)
        ref_logprobs.append(token_logprobs(ref, response_ids[chunk], sampling.temperature))
        values.append(response_logits(roles.values(inputs), width))  # V(s_t) is read where token t is predicted
    logprobs, ref_logprobs, values, entropy = (torch.cat(x) for x in (logprobs, ref_logprobs, values, entropy))
    roles.train(True)
    maskf = mask.float()

    finite = all(bool(torch.isfinite(t).all()) for t in (scores, logprobs, ref_logprobs, values))
    if any_rank(not finite):
        warnings.warn("PPO: a reward, log-prob or value is NaN/inf in this rollout; the iteration is skipped", stacklevel=2)
        return None

    # 4. Per-token rewards: -beta * KL on every token, the score added at the last one; then GAE.
    kl = kl_estimate(logprobs, ref_logprobs, ppo_args.kl_estimator) * maskf
    rewards = per_token_rewards(scores, kl, maskf, beta)
    across_ranks = all_reduce_sum if process_count() > 1 else None
    if ppo_args.whiten_rewards:
        rewards = masked_whiten(rewards, maskf, shift_mean=False, reduce=across_ranks)
    advantages, returns = gae(rewards, values * maskf, maskf, ppo_args.gamma, ppo_args.lam)
    if ppo_args.whiten_advantages:
        advantages = masked_whiten(advantages, maskf, reduce=across_ranks)

    lengths = maskf.sum(dim=1)
    is_weights, engine_stats = None, {}
    if rollout_logprobs is not None:  # the engine's numbers against the training model's, as OpenRLHF and verl monitor them
        gap = (logprobs - rollout_logprobs).abs() * maskf
        engine_stats = {"rollout_logprob_diff_mean": float(gap.sum() / maskf.sum().clamp(min=1)),
                        "rollout_logprob_diff_max": all_reduce_max([float(gap.max())])[0]}
        if ppo_args.rollout_is_cap > 0:
            is_weights = truncated_is_weights(logprobs, rollout_logprobs, ppo_args.rollout_is_cap)
            engine_stats["rollout_is_weight_mean"] = float(masked_mean(is_weights, maskf))
    stats = {**engine_stats,
        "score_raw": float(raw.mean()), "score": float(normalized.mean()), "reward_total": float(rewards.sum(dim=1).mean()),
        "kl": float(kl.sum(dim=1).mean()), "entropy": float(masked_mean(entropy, maskf)),
        "response_length": float(lengths.mean()), "no_eos_rate": float((~ended).float().mean()),
        "value_mean": float(masked_mean(values, maskf)), "explained_variance": explained_variance(values, returns, maskf),
        "rollout_time": time.time() - timing["started"], "generation_time": timing["generated"] - timing["started"],
        "generated_tokens": float(lengths.sum()),
    }
    return Experience(prompt_ids, prompt_mask, response_ids, mask, logprobs, values, advantages, returns, stats, is_weights)
