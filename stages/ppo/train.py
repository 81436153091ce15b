"""Stage 3: PPO rollouts with KL control against the reference (SFT) model.

    tristage ppo --config configs/demo/ppo.yaml [key=value ...]

Reads top to bottom: config (config.py) -> prompts (validated before any model loads) -> the four roles
(roles.py) -> for each iteration: this rank's prompts, make_experience (experience.py: generate, score,
KL-penalized rewards, GAE), the KL controller (kl.py), ppo_update (update.py: clipped policy and value
losses), metrics, checkpoint -> save actor, critic, EMA.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from stages.common.backbone import parameter_counts
from stages.common.config import parse_config, save_resolved_config
from stages.common.data import build_prompt_data, build_sft_data
from stages.common.distributed import all_reduce_sum, barrier
from stages.common.engine import resolve_deepspeed_config
from stages.common.errors import ConfigError
from stages.common.loop import (TRAINER_STATE, NonFiniteStreak, atomic_checkpoint, check_finite_weights, find_checkpoint,
                                refuse_model_only)
from stages.common.plots import plot_curves
from stages.common.seeds import PROMPT_ORDER, ROLLOUT_SAMPLES, TOP_UP_PROMPTS, TOP_UP_SAMPLES, derive_seed
from stages.common.stage import start_stage
from stages.common.tracking import RunTracker

from .config import ARGUMENTS
from .ema import ActorEMA
from .experience import make_experience
from .kl import AdaptiveKLController, FixedKLController
from .roles import build_roles
from .update import PtxBatches, ppo_update

TABLE_COLUMNS = ["score", "kl", "beta", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance",
                 "response_length", "no_eos_rate", "tokens_per_second"]
CURVES = ["score_raw", "score", "kl", "beta", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
          "explained_variance", "group_reward_std", "zero_variance_groups", "dynamic_sampling_dropped", "response_length",
          "no_eos_rate"]
GROUP_COLUMNS = ["group_reward_std", "zero_variance_groups"]  # in place of the critic's columns, for critic-free runs


def table_columns(ppo_args) -> list[str]:
    if ppo_args.uses_critic:
        return TABLE_COLUMNS
    columns = [c for c in TABLE_COLUMNS if c not in ("value_loss", "explained_variance")]
    return columns[:5] + GROUP_COLUMNS + (["dynamic_sampling_dropped"] if ppo_args.dynamic_sampling else []) + columns[5:]


def iteration_prompts(num_prompts: int, iteration: int, rollout_batch_size: int, seed: int) -> list[int]:
    """The prompts of an iteration: a stream of seeded permutations of all prompts, cut into rollout batches,
    so iteration i's prompts depend only on i (resume needs no data cursor)."""
    start, stop = iteration * rollout_batch_size, (iteration + 1) * rollout_batch_size
    picks = []
    for lap in range(start // num_prompts, (stop - 1) // num_prompts + 1):
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(derive_seed(seed, PROMPT_ORDER, lap))).tolist()
        lo, hi = max(start - lap * num_prompts, 0), min(stop - lap * num_prompts, num_prompts)
        picks += order[lo:hi]
    return picks


def check_batch_sizes(ppo_args, train_args, world_size: int) -> int:
    """Prompts per rank; their samples_per_prompt rollouts each must split into whole minibatches."""
    per_rank, remainder = divmod(ppo_args.rollout_batch_size, world_size)
    minibatch = train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps
    if remainder or per_rank * ppo_args.samples_per_prompt % minibatch:
        raise ConfigError(f"rollout_batch_size {ppo_args.rollout_batch_size} x samples_per_prompt {ppo_args.samples_per_prompt} "
                          f"must split into {world_size} process(es) x whole minibatches of per_device_train_batch_size x "
                          f"gradient_accumulation_steps = {minibatch}", key="rollout_batch_size")
    return per_rank


def rank_prompts(prompts: list[dict], picks: list[int], per_rank: int, rank: int) -> list[dict]:
    return [prompts[i] for i in picks[rank * per_rank : (rank + 1) * per_rank]]


def top_up_prompts(prompts: list[dict], iteration: int, per_rank: int, rank: int, seed: int, batch: int):
    """Dynamic sampling's extra prompts for round r of an iteration: a seeded draw that depends only on (iteration, r),
    so a resumed run samples the same ones."""
    def draw(round_: int) -> list[dict]:
        generator = torch.Generator().manual_seed(derive_seed(seed, TOP_UP_PROMPTS, iteration, round_))
        picks = [int(i) for i in torch.randint(len(prompts), (batch,), generator=generator)]
        return rank_prompts(prompts, picks, per_rank, rank)
    return draw


def kl_controller(ppo_args):
    if ppo_args.adaptive_kl:
        return AdaptiveKLController(ppo_args.init_kl_coef, ppo_args.kl_target, ppo_args.kl_horizon)
    return FixedKLController(ppo_args.init_kl_coef)


def rollout_engine(args, roles, model_args, tokenizer, sampling, train_args, rows: int, dist):
    """hf: generate with the actor (gathered once per rollout under ZeRO-3); vllm: an engine in this process for this
    rank's rows, built from the actor's config (an adapter's base) with no weights until the first load_weights."""
    if args.rollout_engine == "hf":
        from stages.common.rollout.hf import HFEngine

        return HFEngine(roles.generation_model, tokenizer, sampling, train_args.per_device_eval_batch_size, dist.device)
    from stages.common.backbone import compute_dtype
    from stages.common.loading import adapter_base_path
    from stages.common.rollout.vllm_engine import VLLMEngine

    path = model_args.model_name_or_path
    return VLLMEngine(adapter_base_path(path) or path, tokenizer, sampling, args, compute_dtype(train_args), rows,
                      train_args.seed + dist.rank, tokenizer_dir=model_args.tokenizer_name_or_path or path,
                      trust_remote_code=model_args.trust_remote_code)


def check_finite_roles(roles, what: str) -> None:
    """No checkpoint or model with a NaN/inf weight is written; every rank checks its shards and all agree, so no
    rank waits in a gather that another rank never reaches."""
    for name, engine in roles.engines.items():
        check_finite_weights(engine.module, f"{what} ({name})")


def save_models(roles, tokenizer, output_dir: Path, ema: ActorEMA | None, dist) -> None:
    """Actor (full model or adapter stack), critic (gae) under critic/, EMA actor under ema/; gathered from
    ZeRO-3 shards, so one process loads them."""
    check_finite_roles(roles, str(output_dir))
    actor_state = roles.actor.consolidated_state_dict() if roles.actor.zero_stage == 3 else None
    critic_state = roles.critic.consolidated_state_dict() if roles.critic is not None and roles.critic.zero_stage == 3 else None
    if dist.is_main:
        roles.save_actor(output_dir, tokenizer, actor_state)
        if roles.has_critic:
            roles.save_critic(output_dir / "critic", tokenizer, critic_state)
    if ema is not None:
        with ema.swapped_in():
            ema_state = roles.actor.consolidated_state_dict() if roles.actor.zero_stage == 3 else None
            if dist.is_main:
                roles.save_actor(output_dir / "ema", tokenizer, ema_state)
    barrier()


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, backbone_args, ppo_args, sampling, rollout_args, reward_settings, train_args = parse_config(
        sys.argv[1:] if argv is None else argv, ARGUMENTS)
    not_trained_yet = ppo_args.validate(backbone_args, sampling, train_args, rollout_args, model_args.model_name_or_path)
    dist, tokenizer = start_stage("ppo", model_args, backbone_args, train_args)
    per_rank = check_batch_sizes(ppo_args, train_args, dist.world_size)
    prompt_data = build_prompt_data(data_args, tokenizer, seed=train_args.seed, max_prompt_length=sampling.max_prompt_length)
    prompts = prompt_data.train
    ptx_rows = []
    if ppo_args.ptx_coef > 0:
        ptx_rows = build_sft_data(dataclasses.replace(data_args, dataset=ppo_args.ptx_dataset, eval_dataset=None, val_size=0.0),
                                  tokenizer, seed=train_args.seed).train
    iterations = train_args.max_steps if train_args.max_steps > 0 else \
        max(1, math.ceil(train_args.num_train_epochs * len(prompts) / ppo_args.rollout_batch_size))
    micro, accumulation = train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps
    optimizer_steps = iterations * ppo_args.ppo_epochs * (per_rank * ppo_args.samples_per_prompt // (micro * accumulation))
    if train_args.dry_run:
        from transformers import AutoModelForCausalLM

        from stages.common.dryrun import model_skeleton, report

        if not Path(model_args.model_name_or_path).exists():
            not_trained_yet.insert(0, model_args.model_name_or_path)
        model = model_skeleton(AutoModelForCausalLM, model_args, backbone_args, train_args, task_type="CAUSAL_LM")
        return report("ppo", model, {"prompts": len(prompts), "ptx_rows": len(ptx_rows), "iterations": iterations,
                                     "optimizer_steps": optimizer_steps, "reward": ppo_args.reward_model,
                                     "not_found_yet": not_trained_yet})
    ds_config = resolve_deepspeed_config(train_args, dist)
    if dist.is_main:
        save_resolved_config(train_args.output_dir, model_args, data_args, backbone_args, ppo_args, sampling, rollout_args,
                             reward_settings, train_args)
        prompt_data.save_report(train_args.output_dir)

    roles = build_roles(ppo_args, model_args, backbone_args, train_args, tokenizer, optimizer_steps, dist, ds_config, reward_settings)
    trainable, total = parameter_counts(roles.actor.module)
    ema = ActorEMA(roles.trainable_actor_parameters(), ppo_args.ema_decay) if ppo_args.ema_decay > 0 else None
    ptx = PtxBatches(ptx_rows, micro, train_args.seed, tokenizer.pad_token_id) if ptx_rows else None
    kl_ctl = kl_controller(ppo_args)

    output_dir = Path(train_args.output_dir)
    tracker = RunTracker(str(output_dir), train_args.report_to if dist.is_main else [], iterations, enabled=dist.is_main,
                         title="ppo", columns=table_columns(ppo_args), settings=train_args)
    samples = ppo_args.samples_per_prompt
    sampler = rollout_engine(rollout_args, roles, model_args, tokenizer, sampling, train_args, per_rank * samples, dist)
    tracker.message(
        f"ppo: {ppo_args.advantage_estimator}{'' if roles.has_critic else ' (no critic)'}, {backbone_args.finetuning_type}{' shared backbone' if ppo_args.shared_backbone else ''}, actor trains {trainable:,} "
        f"of {total:,} parameters, {roles.models_in_memory} model(s) in memory, {len(prompts)} prompts, {iterations} iterations "
        f"x {ppo_args.rollout_batch_size} prompts x {samples} sample(s), {dist.world_size} process(es), "
        f"{'ZeRO-' + str(roles.actor.zero_stage) if ds_config else 'no DeepSpeed'}, rollouts by {sampler.name}")

    start_iteration = 0
    checkpoint = find_checkpoint(train_args)
    if checkpoint is not None:
        refuse_model_only(checkpoint)
        state = {}
        for name, engine in roles.engines.items():
            state = engine.load_checkpoint(checkpoint / name) or state
        start_iteration = int(state["iteration"])
        if hasattr(kl_ctl, "load_state_dict") and state.get("kl_controller"):
            kl_ctl.load_state_dict(state["kl_controller"])
        if ema is not None:
            ema.load_state_dict(torch.load(checkpoint / f"ema_rank{dist.rank}.pt", weights_only=False))
        tracker.message(f"resumed from {checkpoint} at iteration {start_iteration}")

    metrics: dict = {}
    skipped_iterations = 0
    nonfinite = NonFiniteStreak(train_args.max_nonfinite_steps, "PPO iterations")
    weights_changed = True  # the engine starts with no weights of its own
    for iteration in range(start_iteration, iterations):
        picks = iteration_prompts(len(prompts), iteration, ppo_args.rollout_batch_size, train_args.seed)
        rows = rank_prompts(prompts, picks, per_rank, dist.rank)
        beta = kl_ctl.beta
        sync_started = time.time()
        if weights_changed:
            sampler.load_weights(roles.policy_weights())  # a no-op for hf, which generates with the actor itself
        sync_time = time.time() - sync_started
        seed = None
        if sampler.name == "vllm":  # round 0 keeps the seeds of runs without dynamic sampling
            def seed(round_, iteration=iteration):
                return derive_seed(train_args.seed, ROLLOUT_SAMPLES, iteration, dist.rank) if round_ == 0 else \
                    derive_seed(train_args.seed, TOP_UP_SAMPLES, iteration, dist.rank, round_)
        top_up = top_up_prompts(prompts, iteration, per_rank, dist.rank, train_args.seed, ppo_args.rollout_batch_size)
        experience = make_experience(roles, sampler, tokenizer, rows, ppo_args, sampling, beta, train_args.per_device_eval_batch_size,
                                     dist.device, seed, top_up)
        nonfinite.update(experience is None, iteration + 1)
        if experience is None:
            skipped_iterations += 1
            tracker.log(iteration + 1, {"skipped_iterations": skipped_iterations})
            continue
        train_started = time.time()
        update = ppo_update(roles, experience, ppo_args, sampling.temperature, train_args, iteration, ema, ptx, beta)
        train_time = time.time() - train_started
        weights_changed = True

        rollout_stats = experience.stats
        keys = [k for k in sorted(rollout_stats) if not k.endswith("_time") and not k.endswith("_max")]
        averaged = dict(zip(keys, all_reduce_sum([rollout_stats[k] for k in keys])))
        generated_tokens = averaged.pop("generated_tokens")
        metrics = {k: v / dist.world_size for k, v in averaged.items()}
        metrics.update({k: v for k, v in rollout_stats.items() if k.endswith("_max")})  # already the max over ranks
        kl_ctl.update(metrics["kl"], ppo_args.rollout_batch_size * samples)  # Ziegler et al.: n = rollouts in this batch
        metrics.update(update)
        metrics.update({"beta": beta, "next_beta": kl_ctl.beta, "rollout_time": rollout_stats["rollout_time"], "train_time": train_time,
                        "weight_sync_time": sync_time,
                        "tokens_per_second": generated_tokens / max(rollout_stats["generation_time"], 1e-9),
                        "learning_rate": roles.actor.learning_rate(), "skipped_iterations": skipped_iterations})
        tracker.advance_to(iteration + 1, f"score {metrics['score']:.3f} kl {metrics['kl']:.3f}")
        if (iteration + 1) % train_args.logging_steps == 0 or iteration + 1 == iterations:
            tracker.log(iteration + 1, metrics)

        if train_args.save_strategy != "no" and (iteration + 1) % train_args.save_steps == 0 and iteration + 1 < iterations:
            check_finite_roles(roles, f"checkpoint-{iteration + 1}")
            state = {"iteration": iteration + 1, "global_step": iteration + 1, "metrics": metrics,
                     "kl_controller": kl_ctl.state_dict() if hasattr(kl_ctl, "state_dict") else None}

            if train_args.save_only_model:  # the models only: no engine states, so no resume from it
                state["model_only"] = True

            def write(directory: Path) -> None:
                if not train_args.save_only_model:
                    for name, engine in roles.engines.items():
                        engine.save_checkpoint(directory / name, client_state=state)
                    if ema is not None:
                        torch.save(ema.state_dict(), directory / f"ema_rank{dist.rank}.pt")
                save_models(roles, tokenizer, directory / "model", None, dist)  # loadable by one process

            atomic_checkpoint(str(output_dir), iteration + 1, state, train_args.save_total_limit, write)
    tracker.close()

    save_models(roles, tokenizer, output_dir, ema, dist)
    final = {"global_step": iterations, "iterations": iterations, **metrics, "trainable_parameters": trainable,
             "total_parameters": total, "skipped_iterations": skipped_iterations}
    if dist.is_main:
        plot_curves(output_dir / "metrics.jsonl", CURVES, output_dir / "training_curves.png", title=str(output_dir))
        (output_dir / TRAINER_STATE).write_text(json.dumps(final, indent=2))
    barrier()
    tracker.message(f"ppo: saved to {output_dir}" + (f" (EMA actor in {output_dir / 'ema'})" if ema is not None else ""))
    return final
