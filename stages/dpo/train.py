"""Stage DPO: direct preference optimization on preference pairs (the offline alternative to RM + PPO).

    tristage dpo --config configs/demo/dpo.yaml [key=value ...]

Reads top to bottom: config -> pairs (all validated before any model is loaded) -> policy backbone -> the frozen
reference (the starting model; for lora/qlora the policy with its adapter off, so no second copy) -> engine -> loop
(DPO loss) -> save. The output loads as a causal LM (full) or a peft adapter, as SFT's does.
"""
from __future__ import annotations

import sys
from functools import partial

from transformers import AutoModelForCausalLM

from stages.common.backbone import apply_backbone, load_pretrained, parameter_counts
from stages.common.config import ModelArguments, parse_config, save_resolved_config
from stages.common.data import build_preference_data, collate_dpo
from stages.common.dryrun import model_skeleton, report
from stages.common.engine import TrainingEngine, frozen_model, resolve_deepspeed_config
from stages.common.loop import check_eval_plan, fit, save_model, total_steps, write_weight_digest
from stages.common.stage import start_stage
from stages.common.tracking import RunTracker

from .config import ARGUMENTS
from .objective import DPOObjective


def build_reference(dpo_args, model_args, backbone_args, train_args, engine: TrainingEngine, ds_config, dist):
    """The frozen reference as a function of (input_ids, attention_mask) -> logits."""
    if dpo_args.ref_model_name_or_path is None and backbone_args.finetuning_type in ("lora", "qlora"):
        peft_model = engine.module

        def with_adapter_off(input_ids, attention_mask):
            with peft_model.disable_adapter():
                return engine.forward_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return with_adapter_off
    path = dpo_args.ref_model_name_or_path or model_args.model_name_or_path
    ref_args = ModelArguments(**{**vars(model_args), "model_name_or_path": path})
    frozen_backbone = type(backbone_args)(**{**vars(backbone_args), "finetuning_type": "full"})
    reference = frozen_model(load_pretrained(AutoModelForCausalLM, ref_args, frozen_backbone, train_args), ds_config, dist)
    return lambda input_ids, attention_mask: reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


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

    model = apply_backbone(load_pretrained(AutoModelForCausalLM, model_args, backbone_args, train_args), backbone_args, train_args)
    trainable, total = parameter_counts(model)
    engine = TrainingEngine(model, train_args, steps, dist, ds_config)
    reference = build_reference(dpo_args, model_args, backbone_args, train_args, engine, ds_config, dist)

    tracker = RunTracker(train_args.output_dir, train_args.report_to if dist.is_main else [], steps, enabled=dist.is_main, title="dpo",
                         settings=train_args)
    tracker.message(
        f"dpo: {dpo_args.loss_type}, beta {dpo_args.beta}, {backbone_args.finetuning_type}, trainable {trainable:,} of {total:,} "
        f"parameters, {len(data.train)} train pairs, {len(data.eval)} eval pairs, {steps} steps, {dist.world_size} process(es), "
        f"{'ZeRO-' + str(engine.zero_stage) if ds_config else 'no DeepSpeed'}"
    )
    collate = partial(collate_dpo, pad_token_id=tokenizer.pad_token_id)
    final = fit(engine, data.train, data.eval, collate, DPOObjective(dpo_args, reference), train_args, tracker, steps)
    tracker.close()
    if train_args.save_weight_digest:
        write_weight_digest(engine, train_args.output_dir)
    save_model(engine, tokenizer, train_args.output_dir, {**final, "trainable_parameters": trainable, "total_parameters": total})
    tracker.message(f"dpo: saved to {train_args.output_dir} (rewards/accuracies {final.get('rewards/accuracies', float('nan')):.3f})")
    return final
