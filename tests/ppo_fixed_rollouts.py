"""Run by tests/test_data_parallel.py under torchrun: PPO iterations on fixed rollouts (the same prompts and responses
whatever the number of processes; each rank scores and updates on its share), so one process and several can be
compared step for step. Sampling is left out on purpose: each rank samples its own rows, so sampled rollouts differ
with the process count even when everything after them is right.

    torchrun --nproc_per_node N tests/ppo_fixed_rollouts.py OUT.json [ppo overrides...]
"""
from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    from stages.common.config import parse_config
    from stages.common.data import build_prompt_data
    from stages.common.distributed import all_reduce_sum, shutdown_distributed
    from stages.common.engine import resolve_deepspeed_config
    from stages.common.generation import left_pad
    from stages.common.stage import start_stage
    from stages.ppo.config import ARGUMENTS
    from stages.ppo.experience import score_rollouts
    from stages.ppo.roles import build_roles
    from stages.ppo.update import ppo_update

    model_args, data_args, backbone, ppo_args, sampling, _rollout, reward_settings, train_args = parse_config(overrides, ARGUMENTS)
    dist, tokenizer = start_stage("ppo", model_args, backbone, train_args)
    ds_config = resolve_deepspeed_config(train_args, dist)
    roles = build_roles(ppo_args, model_args, backbone, train_args, tokenizer, 100, dist, ds_config, reward_settings)
    prompts = build_prompt_data(data_args, tokenizer, seed=0, max_prompt_length=sampling.max_prompt_length).train
    # rollout_batch_size prompts, each samples_per_prompt times in a row (a group never straddles two ranks)
    n = ppo_args.samples_per_prompt
    total, per_rank = ppo_args.rollout_batch_size * n, ppo_args.rollout_batch_size * n // dist.world_size
    rows = [prompts[i // n % len(prompts)] for i in range(total)][dist.rank * per_rank : (dist.rank + 1) * per_rank]
    # every response has the same length (EOS last), so per-micro-batch means average to the global mean exactly
    generator = torch.Generator().manual_seed(1)
    width = sampling.max_new_tokens
    responses = torch.randint(10, len(tokenizer) - 10, (total, width), generator=generator)
    responses[:, -1] = tokenizer.eos_token_id
    responses[responses == tokenizer.pad_token_id] = 11
    responses = responses[dist.rank * per_rank : (dist.rank + 1) * per_rank].to(dist.device)
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], tokenizer.pad_token_id)
    history = []
    for iteration in range(train_args.max_steps):
        experience = score_rollouts(roles, tokenizer, rows, prompt_ids.to(dist.device), prompt_mask.to(dist.device), responses,
                                    ppo_args, sampling, ppo_args.init_kl_coef, train_args.per_device_eval_batch_size)
        means = all_reduce_sum([experience.stats["score"], experience.stats["kl"]])
        sums = all_reduce_sum([float(experience.advantages.sum()), float((experience.advantages ** 2).sum())])
        stats = {"score": means[0] / dist.world_size, "kl": means[1] / dist.world_size, "advantage_sum": sums[0],
                 "advantage_square_sum": sums[1]}
        update = ppo_update(roles, experience, ppo_args, sampling.temperature, train_args, iteration)
        history.append({**stats, **{k: update[k] for k in ("policy_loss", "value_loss", "kl_loss", "clipfrac", "approx_kl") if k in update}})
    if dist.is_main:
        with open(out, "w") as f:
            json.dump(history, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
