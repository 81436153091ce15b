"""Stage 2: a reward model on human preference pairs.

    tristage rm --config configs/demo/rm.yaml [key=value ...]

Reads top to bottom: config -> pairs (all validated before any model is loaded) -> sequence-classification
backbone with a scalar head -> engine -> loop (Bradley-Terry loss) -> reward statistics -> save.
The output loads as ``AutoModelForSequenceClassification`` (num_labels=1), or as a peft adapter whose
score head is saved with it; ``reward_stats.json`` holds the mean and std of rewards on held-out responses.
"""
from __future__ import annotations

import math
import sys
from functools import partial

import torch
from transformers import AutoModelForSequenceClassification

from rewards.model import SCORE_HEAD, RewardModel, RewardStats
from stages.common.backbone import apply_backbone, load_pretrained, parameter_counts
from stages.common.config import parse_config, save_resolved_config
from stages.common.data import build_preference_data, collate_preferences
from stages.common.distributed import all_reduce_sum
from stages.common.dryrun import model_skeleton, report
from stages.common.engine import TrainingEngine, resolve_deepspeed_config
from stages.common.loop import check_eval_plan, fit, lockstep_batches, save_model, total_steps, write_weight_digest
from stages.common.stage import start_stage
from stages.common.tracking import RunTracker

from .config import ARGUMENTS
from .losses import bradley_terry_loss, centering_penalty


class PairwiseObjective:
    """Mean Bradley-Terry loss over pairs (+ optional centering); accuracy and reward gap as metrics."""

    def __init__(self, center_rewards_coefficient: float, use_margin: bool):
        self.center, self.use_margin = center_rewards_coefficient, use_margin

    def count(self, batch: dict) -> float:
        return float(batch["margin"].numel())

    def loss_sum(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        chosen, rejected = rewards.chunk(2)
        margin = batch["margin"].to(device) if self.use_margin else 0.0
        tie = batch["tie"].to(device)
        loss = bradley_terry_loss(chosen, rejected, margin, tie)
        if self.center:
            loss = loss + self.center * centering_penalty(chosen, rejected)
        gap = (chosen - rejected).detach()
        right = torch.where(tie, 0.5, (gap > 0).float())  # a tie pair counts half, as ties do in win rates
        return loss.sum(), {"accuracy": float(right.sum()), "reward_gap": float(gap.sum())}


@torch.no_grad()
def reward_statistics(engine: TrainingEngine, rows: list[dict], collate, micro_batch: int) -> RewardStats:
    """Mean and std of the rewards of every response (chosen and rejected) in ``rows``, over all ranks."""
    engine.train(False)
    total, total_sq, count = 0.0, 0.0, 0.0
    for batch, counts in lockstep_batches(rows, collate, micro_batch, engine.dist):
        device = engine.dist.device
        rewards = engine.forward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).double()
        if counts:
            total, total_sq, count = total + float(rewards.sum()), total_sq + float((rewards**2).sum()), count + rewards.numel()
    total, total_sq, count = all_reduce_sum([total, total_sq, count])
    mean = total / count
    return RewardStats(mean=mean, std=math.sqrt(max(total_sq / count - mean**2, 0.0) * count / max(count - 1, 1)), count=int(count))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, backbone_args, reward_args, train_args = parse_config(sys.argv[1:] if argv is None else argv, ARGUMENTS)
    dist, tokenizer = start_stage("rm", model_args, backbone_args, train_args)
    data = build_preference_data(data_args, tokenizer, seed=train_args.seed)
    steps = total_steps(len(data.train), train_args, dist)
    check_eval_plan(train_args, data.eval)
    if train_args.dry_run:
        model = model_skeleton(AutoModelForSequenceClassification, model_args, backbone_args, train_args, task_type="SEQ_CLS",
                               head_modules=SCORE_HEAD, num_labels=1)
        return report("rm", model, {"train_pairs": len(data.train), "eval_pairs": len(data.eval), "optimizer_steps": steps})
    ds_config = resolve_deepspeed_config(train_args, dist)
    if dist.is_main:
        save_resolved_config(train_args.output_dir, model_args, data_args, backbone_args, reward_args, train_args)
        data.save_report(train_args.output_dir)

    model = load_pretrained(AutoModelForSequenceClassification, model_args, backbone_args, train_args, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # so the saved model also pools right in plain transformers
    model = apply_backbone(model, backbone_args, train_args, task_type="SEQ_CLS", head_modules=SCORE_HEAD)
    trainable, total = parameter_counts(model)
    engine = TrainingEngine(RewardModel(model), train_args, steps, dist, ds_config)

    tracker = RunTracker(train_args.output_dir, train_args.report_to if dist.is_main else [], steps, enabled=dist.is_main, title="rm",
                         settings=train_args)
    tracker.message(
        f"rm: {backbone_args.finetuning_type}, trainable {trainable:,} of {total:,} parameters, {len(data.train)} train pairs, "
        f"{len(data.eval)} eval pairs, {steps} steps, {dist.world_size} process(es), "
        f"{'ZeRO-' + str(engine.zero_stage) if ds_config else 'no DeepSpeed'}"
    )
    collate = partial(collate_preferences, pad_token_id=tokenizer.pad_token_id)
    objective = PairwiseObjective(reward_args.center_rewards_coefficient, reward_args.use_margin)
    final = fit(engine, data.train, data.eval, collate, objective, train_args, tracker, steps)

    stats = reward_statistics(engine, data.eval or data.train, collate, train_args.per_device_eval_batch_size)
    tracker.log(final["global_step"], {"reward_mean": stats.mean, "reward_std": stats.std})
    tracker.close()
    if dist.is_main:
        stats.save(train_args.output_dir)
    if train_args.save_weight_digest:
        write_weight_digest(engine, train_args.output_dir)
    save_model(engine, tokenizer, train_args.output_dir, {**final, "reward_mean": stats.mean, "reward_std": stats.std,
                                                           "trainable_parameters": trainable, "total_parameters": total})
    tracker.message(f"rm: saved to {train_args.output_dir} (held-out accuracy {final.get('eval_accuracy', float('nan')):.3f})")
    return final
