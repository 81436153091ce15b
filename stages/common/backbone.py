"""The five ways to train a backbone, shared by all stages: full, lora, qlora, freeze, ptuning.

peft does the adapters (LoRA, PrefixTuning = P-Tuning v2, PromptEncoder = P-tuning v1), bitsandbytes the
4-/8-bit base for QLoRA; "freeze" trains a few decoder blocks of any architecture (found as the
``nn.ModuleList`` whose length is the model's layer count, not by Llama's names).
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from torch import nn

from .config import FINETUNING_TYPES, BackboneArguments, ModelArguments
from .data import DEFAULT_CHAT_TEMPLATE
from .errors import ConfigError

STAGE_BACKBONES = {
    "sft": FINETUNING_TYPES,
    "rm": ("full", "lora", "qlora", "freeze"),
    "ppo": ("full", "lora", "qlora"),
}


def check_backbone_args(backbone: BackboneArguments, train_args, stage: str, packing: bool = False) -> None:
    """Refuse combinations that cannot work, before anything is loaded."""
    kind = backbone.finetuning_type
    if kind not in STAGE_BACKBONES[stage]:
        raise ConfigError(f"{kind!r} is not one of {', '.join(STAGE_BACKBONES[stage])} for the {stage} stage", key="finetuning_type")
    if kind == "qlora" and backbone.quantization_bit not in (4, 8):
        raise ConfigError("must be 4 or 8", key="quantization_bit")
    if kind == "qlora" and backbone.quantization_bit == 4 and backbone.quantization_type not in ("nf4", "fp4"):
        raise ConfigError("must be nf4 or fp4", key="quantization_type")
    if kind == "qlora" and train_args.deepspeed:
        raise ConfigError("a bitsandbytes-quantized base cannot be sharded by DeepSpeed; use lora with ZeRO-3, or qlora without deepspeed", key="deepspeed")
    if kind == "ptuning":
        if backbone.ptuning_version not in (1, 2):
            raise ConfigError("must be 2 (P-Tuning v2, deep prefix) or 1 (P-tuning v1, prompt encoder)", key="ptuning_version")
        if train_args.gradient_checkpointing:
            raise ConfigError(
                "peft's prompt learning (prefix key/values, virtual tokens) cannot be combined with gradient checkpointing; "
                "set gradient_checkpointing: false", key="gradient_checkpointing")
        if packing:
            raise ConfigError("packing restarts position ids per example, which virtual tokens break; set packing: false", key="packing")
    if kind == "lora" or kind == "qlora":
        if backbone.lora_rank < 1:
            raise ConfigError("must be >= 1", key="lora_rank")


def load_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not name:
        raise ConfigError("no model given", key="model_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {name!r}: {str(err).splitlines()[0]}", key="model_name_or_path") from None
    if model_args.chat_template:
        template = model_args.chat_template
        tokenizer.chat_template = Path(template).read_text(encoding="utf-8") if Path(template).is_file() else template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(train_args) -> torch.dtype:
    if getattr(train_args, "bf16", False):
        return torch.bfloat16
    if getattr(train_args, "fp16", False):
        return torch.float16
    return torch.float32


def quantization_config(backbone: BackboneArguments, train_args):
    from transformers import BitsAndBytesConfig

    if backbone.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=backbone.quantization_type,
        bnb_4bit_use_double_quant=backbone.double_quantization,
        bnb_4bit_compute_dtype=compute_dtype(train_args),
    )


def load_pretrained(auto_class, model_args: ModelArguments, backbone: BackboneArguments, train_args, **extra):
    """from_pretrained with the stage's dtype, attention and (for qlora) quantization; under ZeRO-3 the
    caller has registered the DeepSpeed config, so transformers partitions the weights while loading."""
    kwargs = dict(trust_remote_code=model_args.trust_remote_code, **extra)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if backbone.finetuning_type == "qlora":
        kwargs["quantization_config"] = quantization_config(backbone, train_args)
        kwargs["dtype"] = compute_dtype(train_args)
    else:
        kwargs["dtype"] = torch.float32  # fp32 master weights; bf16/fp16 come from autocast or DeepSpeed
    try:
        return auto_class.from_pretrained(model_args.model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load {model_args.model_name_or_path!r}: {str(err).splitlines()[0]}", key="model_name_or_path") from None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks: the one whose length equals the layer count."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not candidates:
        raise ConfigError(f"cannot find the {count} decoder blocks of {type(model).__name__}", key="finetuning_type")
    return min(candidates, key=lambda item: len(item[0]))


def _matches(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    return any(fnmatch.fnmatch(name, p) or any(fnmatch.fnmatch(part, p) for part in parts) for p in patterns)


def freeze_blocks(model: nn.Module, backbone: BackboneArguments) -> list[str]:
    """Train the last N (N>0) or first |N| (N<0) blocks, optionally only the sub-modules matching
    ``freeze_trainable_modules``, plus any parameter matching ``freeze_extra_modules``."""
    prefix, blocks = find_decoder_blocks(model)
    n = backbone.freeze_trainable_layers
    if abs(n) > len(blocks):
        raise ConfigError(f"{n} blocks asked, the model has {len(blocks)}", key="freeze_trainable_layers")
    chosen = set(range(len(blocks) - n, len(blocks)) if n > 0 else range(0, -n))
    within = backbone.freeze_trainable_modules
    extra = backbone.freeze_extra_modules or []
    trainable = []
    for name, param in model.named_parameters():
        in_block = name.startswith(prefix + ".")
        train = False
        if in_block:
            index, _, rest = name[len(prefix) + 1 :].partition(".")
            train = int(index) in chosen and (within == ["all"] or _matches(rest, within))
        if extra and _matches(name, extra):
            train = True
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    if not trainable:
        raise ConfigError("no parameter is left to train", key="freeze_trainable_modules")
    return trainable


def peft_config(backbone: BackboneArguments, task_type: str, modules_to_save: list[str] | None = None):
    import peft

    if backbone.finetuning_type in ("lora", "qlora"):
        target = backbone.lora_target
        return peft.LoraConfig(
            task_type=task_type, r=backbone.lora_rank, lora_alpha=backbone.lora_alpha, lora_dropout=backbone.lora_dropout,
            target_modules=target[0] if target == ["all-linear"] else target, modules_to_save=modules_to_save,
        )
    if backbone.ptuning_version == 2:
        return peft.PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=backbone.num_virtual_tokens, prefix_projection=backbone.prefix_projection,
            encoder_hidden_size=backbone.encoder_hidden_size,
        )
    return peft.PromptEncoderConfig(
        task_type=task_type, num_virtual_tokens=backbone.num_virtual_tokens,
        encoder_reparameterization_type=backbone.prompt_encoder_type, encoder_hidden_size=backbone.encoder_hidden_size,
    )


def prepare_for_training(model: nn.Module, backbone: BackboneArguments, train_args) -> nn.Module:
    """k-bit preparation for qlora (fp32 norms, input grads) and gradient checkpointing when asked."""
    import peft

    gradient_checkpointing = bool(getattr(train_args, "gradient_checkpointing", False))
    if backbone.finetuning_type == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        model.config.use_cache = False
    return model


def apply_backbone(model: nn.Module, backbone: BackboneArguments, train_args, task_type: str = "CAUSAL_LM",
                   head_modules: list[str] | None = None) -> nn.Module:
    """Mark what trains; wrap with peft where the mode is an adapter. Returns the model to train.

    ``head_modules`` (a reward model's or critic's new scalar head) always train: with adapters they are
    peft ``modules_to_save`` and are saved with the adapter; with freeze they join the trained blocks."""
    import peft

    kind = backbone.finetuning_type
    model = prepare_for_training(model, backbone, train_args)
    if kind == "full":
        model.requires_grad_(True)
    elif kind == "freeze":
        freeze_blocks(model, backbone)
        for name, param in model.named_parameters():
            if head_modules and _matches(name, head_modules):
                param.requires_grad_(True)
    else:
        model = peft.get_peft_model(model, peft_config(backbone, task_type, head_modules))
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); under ZeRO-3 a parameter's full size is ds_numel, its local shard is smaller."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)


def trained_quantization(path: str):
    """The bitsandbytes config an adapter was trained with (from its tristage_config.yaml), so loading sees
    the same (quantized) base as training did."""
    import argparse

    import yaml

    config_file = Path(path) / "tristage_config.yaml"
    if not config_file.is_file():
        return None
    values = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    if values.get("finetuning_type") != "qlora":
        return None
    known = {k: values[k] for k in ("quantization_bit", "quantization_type", "double_quantization") if k in values}
    backbone = BackboneArguments(finetuning_type="qlora", **known)
    precision = argparse.Namespace(bf16=bool(values.get("bf16")), fp16=bool(values.get("fp16")))
    return quantization_config(backbone, precision)


# A PPO output with LoRA is a stack of adapters on one base (the SFT adapter, if SFT trained one, then the
# PPO adapter); this file lists them so the stack loads (and exports) as trained.
POLICY_STACK_FILE = "tristage_policy.json"


def adapter_base_path(path: str) -> str | None:
    """The base model of an adapter directory or of an adapter stack; None for a full model."""
    stack = Path(path) / POLICY_STACK_FILE
    if stack.is_file():
        return json.loads(stack.read_text())["base_model_name_or_path"]
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


def policy_adapters(path: str) -> list[tuple[str, str]]:
    """(adapter name, directory) of each adapter a policy directory adds to its base, in stacking order."""
    stack = Path(path) / POLICY_STACK_FILE
    if stack.is_file():
        return [(name, str(Path(path) / name)) for name in json.loads(stack.read_text())["adapters"]]
    return [("default", path)] if (Path(path) / "adapter_config.json").is_file() else []


def attach_adapters(model: nn.Module, adapters: list[tuple[str, str]], trainable: bool = False) -> nn.Module:
    """Load adapters onto a base model and make them all active (stacked: their deltas add up)."""
    from peft import PeftModel

    (first, first_dir), rest = adapters[0], adapters[1:]
    model = PeftModel.from_pretrained(model, first_dir, adapter_name=first, is_trainable=trainable)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name, is_trainable=trainable)
    model.base_model.set_adapter([name for name, _ in adapters])
    if not trainable:
        model.requires_grad_(False)
    return model


def load_policy(path: str, dtype: torch.dtype = torch.float32, quantization="trained", trust_remote_code: bool = False) -> nn.Module:
    """A causal LM as a stage saved it: a full model, a base + adapter, or a base + adapter stack (PPO with
    LoRA). Adapters stay unmerged; QLoRA adapters load onto the same 4-bit base they were trained on."""
    from transformers import AutoModelForCausalLM

    base_path = adapter_base_path(path)
    if base_path is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                    quantization_config=None if quantization == "trained" else quantization)
    if quantization == "trained":
        quantization = trained_quantization(path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, quantization_config=quantization,
                                                 trust_remote_code=trust_remote_code)
    return attach_adapters(model, policy_adapters(path))
