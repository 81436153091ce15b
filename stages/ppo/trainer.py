"""One PPO iteration in two halves, in the split DeepSpeed-Chat made clear:

``make_experience``  sample prompts' responses, score them, and compute everything the update needs
                     (old log-probs, reference log-probs, values, per-token rewards, advantages, returns);
``ppo_update``       ``ppo_epochs`` passes of clipped policy and value updates over shuffled minibatches.

Every formula is a pure function in kl.py, advantages.py and losses.py; this file only wires them.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from stages.common.distributed import all_reduce_sum, any_rank
from stages.common.lm import count_label_tokens, token_nll_sum

from .advantages import explained_variance, gae, masked_mean, masked_whiten, per_token_rewards
from .kl import kl_estimate
from .losses import policy_loss, value_loss
from .rollout import generate, generation_config, join, left_pad, response_logits, response_mask, token_entropy, token_logprobs


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

    def inputs(self, rows: torch.Tensor) -> dict:
        return join(self.prompt_ids[rows], self.prompt_mask[rows], self.response_ids[rows], self.mask[rows])

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _in_chunks(count: int, size: int):
    for start in range(0, count, size):
        yield torch.arange(start, min(start + size, count))


def _right_pad_cat(pieces: list[torch.Tensor], pad_token_id: int) -> torch.Tensor:
    width = max(p.shape[1] for p in pieces)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_token_id) for p in pieces])


@torch.no_grad()
def make_experience(roles, tokenizer, rows: list[dict], ppo_args, beta: float, inference_batch: int, device) -> Experience | None:
    """Generation and the no-grad passes run ``inference_batch`` rows at a time (per_device_eval_batch_size):
    for small models the per-token overhead of ``generate`` dominates, so fewer, larger calls are faster.
    Returns None (on every rank) when a score, log-prob or value is not finite: the iteration is skipped."""
    started = time.time()
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    # 1. Generate (the actor's shards gathered once for all of it under ZeRO-3).
    config = generation_config(ppo_args, tokenizer)
    with roles.generation_model() as policy:
        pieces = [generate(policy, prompt_ids[c], prompt_mask[c], config) for c in _in_chunks(len(rows), inference_batch)]
    response_ids = _right_pad_cat(pieces, tokenizer.pad_token_id)
    mask, ended = response_mask(response_ids, tokenizer.eos_token_id)
    generated = time.time()

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
        logits = response_logits(roles.actor_logits(inputs), width)
        logprobs.append(token_logprobs(logits, response_ids[chunk], ppo_args.temperature))
        entropy.append(token_entropy(logits, ppo_args.temperature))
        ref = response_logits(roles.ref_logits(inputs), width)
        ref_logprobs.append(token_logprobs(ref, response_ids[chunk], ppo_args.temperature))
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
    if ppo_args.whiten_rewards:
        rewards = masked_whiten(rewards, maskf, shift_mean=False)
    advantages, returns = gae(rewards, values * maskf, maskf, ppo_args.gamma, ppo_args.lam)
    if ppo_args.whiten_advantages:
        advantages = masked_whiten(advantages, maskf)

    lengths = maskf.sum(dim=1)
    stats = {
        "score_raw": float(raw.mean()), "score": float(normalized.mean()), "reward_total": float(rewards.sum(dim=1).mean()),
        "kl": float(kl.sum(dim=1).mean()), "entropy": float(masked_mean(entropy, maskf)),
        "response_length": float(lengths.mean()), "no_eos_rate": float((~ended).float().mean()),
        "value_mean": float(masked_mean(values, maskf)), "explained_variance": explained_variance(values, returns, maskf),
        "rollout_time": time.time() - started, "generation_time": generated - started, "generated_tokens": float(lengths.sum()),
    }
    return Experience(prompt_ids, prompt_mask, response_ids, mask, logprobs, values, advantages, returns, stats)


class PtxBatches:
    """InstructGPT's ptx term: a language-model loss on pretraining/SFT data mixed into every actor update.
    Batches cycle through a seeded order; the n-th batch is a function of n, so resume needs no extra state."""

    def __init__(self, rows: list[dict], micro_batch: int, seed: int, pad_token_id: int):
        from functools import partial

        from stages.common.data import collate_sft

        self.rows, self.micro_batch = rows, micro_batch
        self.order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        self.collate = partial(collate_sft, pad_token_id=pad_token_id)

    def loss(self, actor_logits, n: int, device) -> torch.Tensor:
        """Mean next-token loss of the n-th batch; ``actor_logits(inputs)`` is the actor's forward."""
        picks = [self.rows[self.order[(n * self.micro_batch + i) % len(self.rows)]] for i in range(self.micro_batch)]
        batch = self.collate(picks)
        labels = batch.pop("labels").to(device)
        logits = actor_logits({k: v.to(device) for k, v in batch.items()})
        return token_nll_sum(logits, labels) / max(count_label_tokens(labels), 1.0)


def ppo_update(roles, experience: Experience, ppo_args, train_args, iteration: int, ema=None, ptx: PtxBatches | None = None) -> dict:
    """``ppo_epochs`` passes over the rollout in minibatches of micro_batch x accumulation rows per rank."""
    micro, accumulation = train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps
    width = experience.response_ids.shape[1]
    sums: dict[str, float] = {}
    skipped = 0
    updates_per_epoch = len(experience) // (micro * accumulation)
    for epoch in range(ppo_args.ppo_epochs):
        generator = torch.Generator().manual_seed(train_args.seed * 100_003 + iteration * 101 + epoch)
        order = torch.randperm(len(experience), generator=generator)
        for update in range(updates_per_epoch):
            for m in range(accumulation):
                start = (update * accumulation + m) * micro
                rows = order[start : start + micro]
                inputs = experience.inputs(rows)
                mask = experience.mask[rows].float()

                logits = response_logits(roles.actor_logits(inputs), width)
                logprobs = token_logprobs(logits, experience.response_ids[rows], ppo_args.temperature)
                pg_loss, pg_stats = policy_loss(logprobs, experience.logprobs[rows], experience.advantages[rows], mask,
                                                ppo_args.clip_range)
                actor_loss = pg_loss
                if ptx is not None:
                    n = ((iteration * ppo_args.ppo_epochs + epoch) * updates_per_epoch + update) * accumulation + m
                    ptx_loss = ptx.loss(roles.actor_logits, n, mask.device)
                    actor_loss = actor_loss + ppo_args.ptx_coef * ptx_loss
                    pg_stats["ptx_loss"] = ptx_loss.item()
                if any_rank(not torch.isfinite(actor_loss)):
                    warnings.warn(f"PPO: non-finite policy loss at iteration {iteration}; this update is skipped", stacklevel=2)
                    for engine in roles.engines.values():
                        engine.skip_backward()
                    skipped += 1
                    continue
                roles.backward_actor(actor_loss / accumulation)

                values = response_logits(roles.values(inputs), width)
                clip_value = ppo_args.clip_range_value if ppo_args.clip_range_value > 0 else None
                vf_loss, vf_stats = value_loss(values, experience.values[rows], experience.returns[rows], mask, clip_value)
                roles.backward_critic(vf_loss / accumulation)

                for key, value in {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), **pg_stats, **vf_stats}.items():
                    sums[key] = sums.get(key, 0.0) + value
                sums["count"] = sums.get("count", 0.0) + 1
            for key, norm in roles.optimizer_step().items():
                sums[key] = sums.get(key, 0.0) + norm * accumulation  # averaged per micro-batch below
            if ema is not None:
                ema.update()
    keys = sorted(sums)
    totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys])))
    count = max(totals.pop("count", 0.0), 1.0)
    result = {k: v / count for k, v in totals.items()}
    result["skipped_updates"] = all_reduce_sum([float(skipped)])[0]
    return result
