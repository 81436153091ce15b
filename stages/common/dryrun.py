"""``dry_run: true`` (``launch/run_stage.sh <stage> --dry-run``): everything a stage checks before training,
in seconds and without weights — the config, every data record, the tokenizer and chat template, and the
model's skeleton with the chosen backbone on the meta device — then a report and exit 0. The way to catch a
broken config before a GPU allocation."""
from __future__ import annotations

import json

import torch


def model_skeleton(auto_class, model_args, backbone_args, train_args, task_type: str, head_modules=None, **config_kwargs):
    """The model as the stage would train it, on the meta device: the config is read, no weight is."""
    from .backbone import apply_backbone
    from .estimate import load_model_config

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # TrainingArguments registered the ZeRO-3 config: no partitioned init of a skeleton
    config = load_model_config(model_args)  # the model's own config.json, else the recipe's architecture_config
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = auto_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
    if backbone_args.finetuning_type == "qlora":  # bitsandbytes cannot quantize meta tensors; LoRA on top is what trains
        from dataclasses import replace

        backbone_args = replace(backbone_args, finetuning_type="lora")
    return apply_backbone(model, backbone_args, train_args, task_type=task_type, head_modules=head_modules)


def report(stage: str, model, facts: dict) -> dict:
    from .backbone import parameter_counts

    trainable, total = parameter_counts(model)
    summary = {"stage": stage, "dry_run": "ok", "trainable_parameters": trainable, "total_parameters": total, **facts}
    print(json.dumps(summary, indent=2))
    return summary
