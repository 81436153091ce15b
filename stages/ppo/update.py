"""The second half of a PPO iteration: ``ppo_epochs`` passes of clipped policy and (gae) value updates over shuffled
minibatches of the experience (``experience.py``), with the KL as a loss term (``kl_in: loss``) and InstructGPT's
optional pretraining loss (ptx). The losses are pure functions in losses.py."""
from __future__ import annotations

import warnings

import torch

from stages.common.distributed import all_reduce_sum, any_rank
from stages.common.generation import response_logits, token_logprobs
from stages.common.lm import count_label_tokens, token_nll_sum
from stages.common.seeds import MINIBATCH_ORDER, derive_seed

from .experience import Experience
from .losses import kl_loss, policy_loss, value_loss


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


def ppo_update(roles, experience: Experience, ppo_args, temperature: float, train_args, iteration: int, ema=None,
               ptx: PtxBatches | None = None, beta: float = 0.0) -> dict:
    """``ppo_epochs`` passes over the rollout in minibatches of micro_batch x accumulation rows per rank; ``beta``
    weighs the KL loss term (kl_in: loss)."""
    micro, accumulation = train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps
    width = experience.response_ids.shape[1]
    sums: dict[str, float] = {}
    skipped = 0
    updates_per_epoch = len(experience) // (micro * accumulation)
    for epoch in range(ppo_args.ppo_epochs):
        generator = torch.Generator().manual_seed(derive_seed(train_args.seed, MINIBATCH_ORDER, iteration, epoch))
        order = torch.randperm(len(experience), generator=generator)
        for update in range(updates_per_epoch):
            for m in range(accumulation):
                start = (update * accumulation + m) * micro
                rows = order[start : start + micro]
                inputs = experience.inputs(rows)
                mask = experience.mask[rows].float()

                logits = response_logits(roles.actor_logits(inputs, keep=width + 1), width)
                logprobs = token_logprobs(logits, experience.response_ids[rows], temperature)
                weights = experience.is_weights[rows] if experience.is_weights is not None else None
                pg_loss, pg_stats = policy_loss(logprobs, experience.logprobs[rows], experience.advantages[rows], mask,
                                                ppo_args.clip_range, weights, ppo_args.loss_aggregation)
                actor_loss = pg_loss
                if experience.ref_logprobs is not None:
                    kl_term = kl_loss(logprobs, experience.ref_logprobs[rows], mask, ppo_args.kl_estimator, ppo_args.loss_aggregation)
                    actor_loss = actor_loss + beta * kl_term
                    pg_stats["kl_loss"] = kl_term.item()
                if ptx is not None:
                    n = ((iteration * ppo_args.ppo_epochs + epoch) * updates_per_epoch + update) * accumulation + m
                    ptx_loss = ptx.loss(roles.actor_logits, n, mask.device)
                    actor_loss = actor_loss + ppo_args.ptx_coef * ptx_loss
                    pg_stats["ptx_loss"] = ptx_loss.item()
                vf_loss, vf_stats = torch.zeros((), device=mask.device), {}
                if roles.has_critic:
                    values = response_logits(roles.values(inputs), width)
                    clip_value = ppo_args.clip_range_value if ppo_args.clip_range_value > 0 else None
                    vf_loss, vf_stats = value_loss(values, experience.values[rows], experience.returns[rows], mask, clip_value)
                # Both losses are checked before either backward: DeepSpeed counts micro-steps, so a skip must replace
                # the whole micro-batch on every engine (and every rank must agree).
                bad = [name for name, loss in (("policy", actor_loss), ("value", vf_loss)) if not torch.isfinite(loss)]
                if any_rank(bool(bad)):
                    warnings.warn(f"PPO: non-finite {' and '.join(bad) or 'loss on another rank'} loss at iteration {iteration}; "
                                  "this update is skipped", stacklevel=2)
                    for engine in roles.engines.values():
                        engine.skip_backward()
                    skipped += 1
                    continue
                roles.backward_actor(actor_loss / accumulation)
                if roles.has_critic:
                    roles.backward_critic(vf_loss / accumulation)
                    vf_stats["value_loss"] = vf_loss.item()

                for key, value in {"policy_loss": pg_loss.item(), **pg_stats, **vf_stats}.items():
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
