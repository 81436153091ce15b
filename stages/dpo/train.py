"""Stage DPO: direct preference optimization on preference pairs (the offline alternative to RM + PPO).

    tristage dpo --config configs/demo/dpo.yaml [key=value ...]

Reads top to bottom: config -> pairs (all validated before any model is loaded) -> policy (the SFT model; lora/qlora: a
new "dpo" adapter stacked over SFT's adapter, if any) -> the frozen reference (the starting model; for lora/qlora the
policy with its "dpo" adapter off, so no second copy) -> optionally the reference's log-probs for every pair, once ->
engine -> loop (DPO loss) -> save. The output loads as a causal LM (full, freeze) or a peft adapter stack, as PPO's does.
"""
from __future__ import annotations

import gc
import sys
from functools import partial

import torch
from transformers import AutoModelForCausalLM

from stages.common.backbone import compute_dtype, parameter_counts
from stages.common.config import parse_config, save_resolved_config
from stages.common.data import build_preference_data, collate_dpo
from stages.common.dryrun import model_skeleton, report
from stages.common.engine import TrainingEngine, frozen_model, resolve_deepspeed_config, zero_stage
from stages.common.loading import adapter_base_path, load_policy
from stages.common.loop import check_eval_plan, fit, save_model, total_steps, write_weight_digest
from stages.common.plots import plot_curves
from stages.common.policy import load_trainable_policy, reference_adapters, save_policy
from stages.common.stage import start_stage
from stages.common.tracking import RunTracker

from .config import ARGUMENTS
from .objective import DPOObjective, response_logps

DPO_ADAPTER = "dpo"
CURVES = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
          "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"]


def build_reference(dpo_args, model_args, backbone_args, train_args, engine: TrainingEngine, sft_adapters: list[str], ds_config, dist):
    """The frozen reference as a function of (input_ids, attention_mask) -> logits, and whether it is a second model."""
    if dpo_args.ref_model_name_or_path is None and backbone_args.finetuning_type in ("lora", "qlora"):
        def with_adapter_off(input_ids, attention_mask):
            with reference_adapters(engine.module, sft_adapters, DPO_ADAPTER), engine.forward_context():
                return engine.forward_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return with_adapter_off, False
    # full/freeze: the starting model (SFT adapters unmerged on their base) in the compute dtype, as PPO's reference
    path = dpo_args.ref_model_name_or_path or model_args.model_name_or_path
    device = None if zero_stage(ds_config) == 3 else dist.device
    reference = frozen_model(load_policy(path, dtype=compute_dtype(train_args), quantization=None,
                                         trust_remote_code=model_args.trust_remote_code, device=device), ds_config, dist)

    def separate(input_ids, attention_mask):
        with engine.forward_context():
            return reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return separate, True


@torch.no_grad()
def precompute_reference(rows: list[dict], reference, pad_token_id: int, batch_size: int, device) -> None:
    """Add the reference's summed response log-probs to every pair (``ref_chosen_logp``, ``ref_rejected_logp``). Every
    rank computes all rows in the same order (a ZeRO-3 reference needs every rank in each forward)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate_dpo(chunk, pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logps = response_logps(reference(ids, mask), ids, batch["response_mask"].to(device))[0].double().cpu()
        for i, row in enumerate(chunk):
            row["ref_chosen_logp"], row["ref_rejected_logp"] = float(logps[i]), float(logps[len(chunk) + i])


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, backbone_args, dpo_args, train_args = parse_config(sys.argv[1:] if argv is None else argv, ARGUMENTS)
    dist, tokenizer = start_stage("dpo", model_args, backbone_args, train_args)
    data = build_preference_data(data_args, tokenizer, seed=train_args.seed)
    steps = total_steps(len(data.train), train_args, dist)
    check_eval_plan(train_args, data.eval)
    if train_args.dry_run:
        model = model_skeleton(AutoModelForCausalLM, model_args, backbone_args, train_args, task_type="CAUSAL_LM")
        return report("dpo", model, {"train_pairs": len(data.train), "eval_pairs": len(data.eval), "optimizer_steps": steps})
    ds_config = resolve_deepspeed_config(train_args, dist)
    if dist.is_main:
        save_resolved_config(train_args.output_dir, model_args, data_args, backbone_args, dpo_args, train_args)
        data.save_report(train_args.output_dir)

    model, sft_adapters = load_trainable_policy(model_args, backbone_args, train_args, DPO_ADAPTER)
    trainable, total = parameter_counts(model)
    engine = TrainingEngine(model, train_args, steps, dist, ds_config)
    base_path = adapter_base_path(model_args.model_name_or_path) or model_args.model_name_or_path
    engine.save_weights = lambda module, directory, state_dict: save_policy(module, directory, tokenizer, sft_adapters, base_path,
                                                                            DPO_ADAPTER, state_dict)
    reference, separate = build_reference(dpo_args, model_args, backbone_args, train_args, engine, sft_adapters, ds_config, dist)

    tracker = RunTracker(train_args.output_dir, train_args.report_to if dist.is_main else [], steps, enabled=dist.is_main, title="dpo",
                         settings=train_args)
    stack = f" over {', '.join(sft_adapters)}" if sft_adapters else ""
    tracker.message(
        f"dpo: {dpo_args.loss_type}, beta {dpo_args.beta}, {backbone_args.finetuning_type}{stack}, trainable {trainable:,} of {total:,} "
        f"parameters, {len(data.train)} train pairs, {len(data.eval)} eval pairs, {steps} steps, {dist.world_size} process(es), "
        f"{'ZeRO-' + str(engine.zero_stage) if ds_config else 'no DeepSpeed'}, reference: "
        f"{'a separate frozen model' if separate else 'the policy with its dpo adapter off'}"
        f"{', log-probs precomputed' if dpo_args.precompute_ref_log_probs else ''}"
    )
    ties, with_margin = (sum(1 for r in data.train if r.get(k)) for k in ("tie", "margin"))
    if ties or with_margin:  # what the pairs' extra fields do here
        tracker.message(f"dpo: {ties} tie pair(s) train with the label 1/2 (neither response preferred); "
                        f"{with_margin} pair(s) carry a margin, which DPO's losses have no place for (the reward model uses it)")
    if dpo_args.precompute_ref_log_probs:
        engine.train(False)
        for rows in (data.train, data.eval):
            precompute_reference(rows, reference, tokenizer.pad_token_id, train_args.per_device_eval_batch_size, dist.device)
        if separate:  # training never calls it again
            reference = None
            gc.collect()
    collate = partial(collate_dpo, pad_token_id=tokenizer.pad_token_id)
    final = fit(engine, data.train, data.eval, collate, DPOObjective(dpo_args, reference), train_args, tracker, steps)
    tracker.close()
    if train_args.save_weight_digest:
        write_weight_digest(engine, train_args.output_dir)
    save_model(engine, tokenizer, train_args.output_dir, {**final, "trainable_parameters": trainable, "total_parameters": total})
    if dist.is_main:
        plot_curves(f"{train_args.output_dir}/metrics.jsonl", CURVES, f"{train_args.output_dir}/training_curves.png",
                    title=train_args.output_dir)
    tracker.message(f"dpo: saved to {train_args.output_dir} (rewards/accuracies {final.get('rewards/accuracies', float('nan')):.3f})")
    return final
