"""The first half of a PPO iteration (DeepSpeed-Chat's "generate experience" and "compute rewards"):
sample ``samples_per_prompt`` responses per prompt, score them (dropping groups without signal and sampling new
prompts with ``dynamic_sampling``), and compute everything the update needs — old log-probs, reference log-probs,
values (gae), per-token rewards, advantages and returns. ``update.py`` is the second half. Every formula is a pure
function in kl.py and advantages.py; this file only wires them.
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

from .advantages import (discounted_returns, explained_variance, gae, group_baseline, group_stats, masked_mean, masked_whiten,
                         per_token_rewards)
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
    ref_logprobs: torch.Tensor | None = None  # kept for kl_in: loss

    def inputs(self, rows: torch.Tensor) -> dict:
        return join(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows], self.mask[rows])

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _in_chunks(count: int, size: int):
    for start in range(0, count, size):
        yield torch.arange(start, min(start + size, count))


@dataclass
class Group:
    """The n sampled responses of one prompt and their sequence scores (raw, normalized, and as the update uses them)."""

    row: dict
    responses: list[list[int]]
    logprobs: list[list[float]] | None
    raw: torch.Tensor
    normalized: torch.Tensor
    scores: torch.Tensor

    def has_signal(self, eps: float = 1e-6) -> bool:
        return float(self.scores.max() - self.scores.min()) > eps


def score_responses(roles, tokenizer, prompts: list[str], response_ids: torch.Tensor, ppo_args):
    """(raw, normalized, scores): the reward sources' scores of the decoded responses (the reward model re-renders them
    through its chat template), and the scores after reward_clip and the missing-EOS penalty."""
    mask, ended = response_mask(response_ids, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(response_ids, mask)], skip_special_tokens=True)
    raw, normalized = roles.reward(prompts, texts)
    scores = normalized.clone()
    if ppo_args.reward_clip > 0:
        scores = scores.clamp(-ppo_args.reward_clip, ppo_args.reward_clip)
    scores -= ppo_args.missing_eos_penalty * (~ended).double().cpu()
    return raw, normalized, scores.float()


def sample_groups(roles, engine, tokenizer, rows: list[dict], ppo_args, seed: int | None) -> list[Group]:
    n = ppo_args.samples_per_prompt
    rollouts = engine.generate([r["prompt_ids"] for r in rows], n=n, seed=seed)
    response_ids, _ = pad_rows(rollouts.response_ids, tokenizer.pad_token_id)
    raw, normalized, scores = score_responses(roles, tokenizer, [r["prompt"] for r in rows for _ in range(n)], response_ids, ppo_args)
    return [Group(row, rollouts.response_ids[i * n : (i + 1) * n], rollouts.logprobs[i * n : (i + 1) * n] if rollouts.logprobs else None,
                  raw[i * n : (i + 1) * n], normalized[i * n : (i + 1) * n], scores[i * n : (i + 1) * n]) for i, row in enumerate(rows)]


def collect_groups(roles, engine, tokenizer, rows: list[dict], ppo_args, seed: int | None, top_up=None) -> tuple[list[Group], dict]:
    """One group per row. With dynamic_sampling (DAPO), groups whose scores are all equal are dropped and
    ``top_up(round)`` (that round's new prompts for this rank, as many as ``rows``) is sampled in their place, for at
    most dynamic_sampling_max_rounds rounds; every rank runs the same rounds (a ZeRO-3 actor generates collectively).
    Groups still missing then are filled with dropped ones, which a group baseline gives no advantage."""
    groups = sample_groups(roles, engine, tokenizer, rows, ppo_args, seed(0) if seed else None)
    if not ppo_args.dynamic_sampling:
        return groups, {}
    kept = [g for g in groups if g.has_signal()]
    dropped = [g for g in groups if not g.has_signal()]
    sampled, rounds = len(groups), 1
    while rounds < ppo_args.dynamic_sampling_max_rounds and any_rank(len(kept) < len(rows)):
        more = sample_groups(roles, engine, tokenizer, top_up(rounds), ppo_args, seed(rounds) if seed else None)
        kept += [g for g in more if g.has_signal()]
        dropped += [g for g in more if not g.has_signal()]
        sampled, rounds = sampled + len(more), rounds + 1
    filled = max(len(rows) - len(kept), 0)
    stats = {"dynamic_sampling_dropped": len(dropped) / sampled, "dynamic_sampling_rounds": float(rounds),
             "dynamic_sampling_filled": filled / len(rows)}
    return kept[: len(rows)] + dropped[:filled], stats


@torch.no_grad()
def make_experience(roles, engine, tokenizer, rows: list[dict], ppo_args, sampling, beta: float, inference_batch: int,
                    device, seed=None, top_up=None) -> Experience | None:
    """The rollout engine samples samples_per_prompt responses per row (hf: ``inference_batch`` rows per generate call,
    since for small models the per-token overhead of ``generate`` dominates; vllm: all at once, round r drawn from
    ``seed(r)``); the no-grad passes run ``inference_batch`` rows at a time. Returns None (on every rank) when a score,
    log-prob or value is not finite: the iteration is skipped."""
    started = time.time()
    groups, sampling_stats = collect_groups(roles, engine, tokenizer, rows, ppo_args, seed, top_up)
    engine.sleep()  # vLLM's sleep mode hands the GPU memory back for scoring and the update
    timing = {"started": started, "generated": time.time()}
    n = ppo_args.samples_per_prompt
    samples = [g.row for g in groups for _ in range(n)]
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in samples], tokenizer.pad_token_id)
    response_ids, _ = pad_rows([ids for g in groups for ids in g.responses], tokenizer.pad_token_id)
    rollout_logprobs = None
    if groups[0].logprobs is not None:
        rollout_logprobs = torch.zeros(response_ids.shape)
        for i, row in enumerate(lp for g in groups for lp in g.logprobs):
            rollout_logprobs[i, : len(row)] = torch.tensor(row)
        rollout_logprobs = rollout_logprobs.to(device)
    scored = tuple(torch.cat([getattr(g, key) for g in groups]) for key in ("raw", "normalized", "scores"))
    experience = score_rollouts(roles, tokenizer, samples, prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device),
                                ppo_args, sampling, beta, inference_batch, timing, rollout_logprobs, scored)
    if experience is not None:
        experience.stats.update(sampling_stats)
    return experience


@torch.no_grad()
def score_rollouts(roles, tokenizer, rows: list[dict], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   response_ids: torch.Tensor, ppo_args, sampling, beta: float, inference_batch: int,
                   timing: dict | None = None, rollout_logprobs: torch.Tensor | None = None, scored=None) -> Experience | None:
    """Everything the update needs from sampled responses (rows in groups of samples_per_prompt): scores, log-probs,
    values, per-token rewards, advantages and returns (DeepSpeed-Chat's "compute rewards"). Whitening uses every rank's
    rollout, so the result does not depend on how many processes share it. ``rollout_logprobs``: the engine's log-probs
    of the sampled tokens, compared with the actor's (``rollout_logprob_diff``); the ratio always uses the actor's own.
    ``scored``: score_responses' result when the caller has it already."""
    device = prompt_ids.device
    timing = timing or {"started": time.time(), "generated": time.time()}
    mask, ended = response_mask(response_ids, tokenizer.eos_token_id)

    # 2. Score the responses.
    raw, normalized, scores = scored or score_responses(roles, tokenizer, [r["prompt"] for r in rows], response_ids, ppo_args)
    scores = scores.to(device)

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
        if roles.has_critic:
            values.append(response_logits(roles.values(inputs), width))  # V(s_t) is read where token t is predicted
        else:
            values.append(torch.zeros(len(chunk), width, device=device))
    logprobs, ref_logprobs, values, entropy = (torch.cat(x) for x in (logprobs, ref_logprobs, values, entropy))
    roles.train(True)
    maskf = mask.float()

    finite = all(bool(torch.isfinite(t).all()) for t in (scores, logprobs, ref_logprobs, values))
    if any_rank(not finite):
        warnings.warn("PPO: a reward, log-prob or value is NaN/inf in this rollout; the iteration is skipped", stacklevel=2)
        return None

    # 4. Per-token rewards: -beta * KL on every token (kl_in: reward), the score (after the estimator's group baseline)
    # added at the last one; then GAE with the critic's values, or the returns-to-go for the critic-free estimators.
    kl = kl_estimate(logprobs, ref_logprobs, ppo_args.kl_estimator) * maskf
    n = ppo_args.samples_per_prompt
    shaped = group_baseline(scores, n, ppo_args.advantage_estimator, ppo_args.grpo_scale_by_std)
    rewards = per_token_rewards(shaped, kl, maskf, beta if ppo_args.kl_in == "reward" else 0.0)
    across_ranks = all_reduce_sum if process_count() > 1 else None
    if ppo_args.whiten_rewards:
        rewards = masked_whiten(rewards, maskf, shift_mean=False, reduce=across_ranks)
    if roles.has_critic:
        advantages, returns = gae(rewards, values * maskf, maskf, ppo_args.gamma, ppo_args.lam)
    else:
        advantages = returns = discounted_returns(rewards, maskf, ppo_args.gamma)
    if ppo_args.whitens_advantages:
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
        **({"value_mean": float(masked_mean(values, maskf)), "explained_variance": explained_variance(values, returns, maskf)}
           if roles.has_critic else {}),
        **(group_stats(scores.cpu(), n) if n > 1 else {}),
        "rollout_time": time.time() - timing["started"], "generation_time": timing["generated"] - timing["started"],
        "generated_tokens": float(lengths.sum()),
    }
    return Experience(prompt_ids, prompt_mask, response_ids, mask, logprobs, values, advantages, returns, stats, is_weights,
                      ref_logprobs if ppo_args.kl_in == "loss" else None)
