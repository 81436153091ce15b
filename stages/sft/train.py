"""Stage 1: supervised fine-tuning on instruction data.

    tristage sft --config configs/demo/sft.yaml [key=value ...]

Reads top to bottom: config -> data (all validated before any model is loaded) -> backbone -> engine ->
loop -> save. Loss is the mean next-token loss over response tokens only.
"""
from __future__ import annotations

import math
import sys
from functools import partial

from transformers import AutoModelForCausalLM

from stages.common.backbone import apply_backbone, load_pretrained, parameter_counts
from stages.common.config import parse_config, save_resolved_config
from stages.common.data import build_sft_data, collate_sft
from stages.common.dryrun import model_skeleton, report
from stages.common.engine import TrainingEngine, resolve_deepspeed_config
from stages.common.lm import CausalLMObjective
from stages.common.loop import check_eval_plan, fit, save_model, total_steps, write_weight_digest
from stages.common.stage import start_stage
from stages.common.tracking import RunTracker

from .config import ARGUMENTS


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, backbone_args, train_args = parse_config(sys.argv[1:] if argv is None else argv, ARGUMENTS)
    dist, tokenizer = start_stage("sft", model_args, backbone_args, train_args, packing=data_args.packing)
    data = build_sft_data(data_args, tokenizer, seed=train_args.seed)
    steps = total_steps(len(data.train), train_args, dist)
    check_eval_plan(train_args, data.eval)
    if train_args.dry_run:
        model = model_skeleton(AutoModelForCausalLM, model_args, backbone_args, train_args, task_type="CAUSAL_LM")
        return report("sft", model, {"train_rows": len(data.train), "eval_rows": len(data.eval), "optimizer_steps": steps})
    ds_config = resolve_deepspeed_config(train_args, dist)
    if dist.is_main:
        save_resolved_config(train_args.output_dir, model_args, data_args, backbone_args, train_args)
        data.save_report(train_args.output_dir)

    model = load_pretrained(AutoModelForCausalLM, model_args, backbone_args, train_args)
    model = apply_backbone(model, backbone_args, train_args)
    if train_args.neftune_noise_alpha:  # NEFTune: uniform noise on the input embeddings while training (transformers' hook)
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(model, train_args.neftune_noise_alpha)
    trainable, total = parameter_counts(model)
    engine = TrainingEngine(model, train_args, steps, dist, ds_config)

    report_to = train_args.report_to if dist.is_main else []
    tracker = RunTracker(train_args.output_dir, report_to, steps, enabled=dist.is_main, title="sft", settings=train_args)
    tracker.message(
        f"sft: {backbone_args.finetuning_type}, trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%), "
        f"{len(data.train)} train rows, {len(data.eval)} eval rows, {steps} steps, {dist.world_size} process(es), "
        f"{'ZeRO-' + str(engine.zero_stage) if ds_config else 'no DeepSpeed'}"
    )
    add_perplexity = lambda metrics: {"eval_perplexity": math.exp(min(metrics["eval_loss"], 50.0))}
    final = fit(engine, data.train, data.eval, partial(collate_sft, pad_token_id=tokenizer.pad_token_id), CausalLMObjective(train_args.label_smoothing_factor),
                train_args, tracker, steps, extra_eval=add_perplexity)
    tracker.close()

    if train_args.save_weight_digest:
        write_weight_digest(engine, train_args.output_dir)
    save_model(engine, tokenizer, train_args.output_dir, {**final, "trainable_parameters": trainable, "total_parameters": total})
    tracker.message(f"sft: saved to {train_args.output_dir}")
    return final
