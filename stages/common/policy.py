"""A causal-LM policy that trains on top of what SFT saved (PPO's actor, DPO's policy): full weights, or a new adapter
stacked over the SFT adapter(s), and its save as a full model or as an adapter stack (tristage_policy.json)."""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from .backbone import (
    apply_backbone,
    load_pretrained,
    peft_config,
    prepare_for_training,
    upcast_trainable,
)
from .loading import (
    POLICY_STACK_FILE,
    adapter_base_path,
    attach_adapters,
    policy_adapters,
)


def mark_trainable(model: nn.Module, adapter_names: list[str]) -> None:
    """peft's set_adapter makes every active adapter trainable; we decide: only these adapters."""
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad_(any(a in parts for a in adapter_names))


def upcast_unless_deepspeed(model: nn.Module, train_args) -> None:
    if not train_args.deepspeed:  # DeepSpeed keeps its own float32 master weights
        upcast_trainable(model)


def with_path(model_args, path: str):
    return dataclasses.replace(model_args, model_name_or_path=path)


def load_trainable_policy(model_args, backbone, train_args, adapter: str) -> tuple[nn.Module, list[str]]:
    """The SFT model as the starting policy, and the names of the SFT adapters it stacks on. full/freeze: the SFT
    adapters (if any) merged, then the mode's trainable weights; lora/qlora: a new adapter named ``adapter`` trains
    over the frozen SFT adapter(s) (their deltas add up)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = model_args.model_name_or_path
    # a single SFT adapter is "sft" here (peft saves only non-default names in sub-directories of a stack)
    sft_adapters = [("sft" if name == "default" else name, directory) for name, directory in policy_adapters(path)]
    model = load_pretrained(AutoModelForCausalLM, with_path(model_args, adapter_base_path(path) or path), backbone, train_args)
    if backbone.finetuning_type not in ("lora", "qlora"):
        if sft_adapters:
            model = attach_adapters(model, sft_adapters).merge_and_unload()
        return apply_backbone(model, backbone, train_args), []
    model = prepare_for_training(model, backbone, train_args)
    config = peft_config(backbone, "CAUSAL_LM")
    if sft_adapters:
        model = attach_adapters(model, sft_adapters)
        model.add_adapter(adapter, config)
    else:
        model = get_peft_model(model, config, adapter_name=adapter)
    names = [name for name, _ in sft_adapters]
    model.base_model.set_adapter(names + [adapter])
    mark_trainable(model, [adapter])
    upcast_unless_deepspeed(model, train_args)
    return model, names


def activate_adapters(peft_model: nn.Module, names: list[str], trainable: list[str]) -> None:
    """Compute with exactly these adapters stacked (none: the bare base), and let only ``trainable`` ones train."""
    lora_model = peft_model.base_model
    if names:
        lora_model.enable_adapter_layers()
        lora_model.set_adapter(names)
    else:
        lora_model.disable_adapter_layers()
    mark_trainable(peft_model, trainable)


@contextmanager
def reference_adapters(peft_model: nn.Module, sft_adapters: list[str], adapter: str):
    """The policy as its reference for the duration: the SFT adapter(s) only (the trained adapter off), or the bare base
    when SFT trained full weights; then back to the stack, with only ``adapter`` trainable."""
    try:
        activate_adapters(peft_model, sft_adapters, trainable=[adapter])
        yield
    finally:
        activate_adapters(peft_model, sft_adapters + [adapter], trainable=[adapter])


def save_policy(model: nn.Module, directory: Path, tokenizer, sft_adapters: list[str], base_path: str, adapter: str,
                state_dict: dict | None = None) -> None:
    """A full model, or the adapter stack (SFT adapter(s) + the trained adapter) with tristage_policy.json naming the base."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        names = sft_adapters + [adapter]
        model.save_pretrained(directory, selected_adapters=names, state_dict=state_dict)
        (directory / POLICY_STACK_FILE).write_text(json.dumps({"base_model_name_or_path": base_path, "adapters": names}, indent=2))
    else:
        model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
