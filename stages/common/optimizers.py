"""The optimizers ``optim`` names, built as the HF Trainer builds them: torch's AdamW (plain or fused), SGD,
transformers' Adafactor, and bitsandbytes' 8-bit and paged optimizers (QLoRA's third ingredient). ``optim_args``
("key=value,key=value") adds keyword arguments. No weight decay on biases and norm weights (1-D parameters)."""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "lion_8bit")
BITSANDBYTES = {"adamw_bnb_8bit": "AdamW8bit", "adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                "paged_adamw_32bit": "PagedAdamW32bit", "lion_8bit": "Lion8bit"}


def optimizer_name(train_args) -> str:
    return str(getattr(train_args.optim, "value", train_args.optim))  # TrainingArguments holds an OptimizerNames enum


def parse_optim_args(text: str | None) -> dict:
    """``"betas=(0.9,0.95)"`` is not supported by HF either: numbers, booleans and words, comma-separated."""
    kwargs = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        kwargs[key.strip()] = _value(value.strip())
    return kwargs


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parameter_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in params:
        full_shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the unpartitioned shape here
        (no_decay if len(full_shape) < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: list[nn.Parameter], train_args) -> torch.optim.Optimizer:
    name, extra = optimizer_name(train_args), parse_optim_args(train_args.optim_args)
    groups = parameter_groups(params, train_args.weight_decay)
    lr, betas, eps = train_args.learning_rate, (train_args.adam_beta1, train_args.adam_beta2), train_args.adam_epsilon
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if name.endswith("fused") else {}), **extra)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, **extra)
    if name == "adafactor":  # a fixed learning rate from the schedule, as the Trainer sets it up
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, **{"scale_parameter": False, "relative_step": False, "warmup_init": False, **extra})
    import bitsandbytes as bnb

    optimizer = getattr(bnb.optim, BITSANDBYTES[name])
    return optimizer(groups, lr=lr, betas=betas, **({} if name == "lion_8bit" else {"eps": eps}), **extra)


def build_optimizer(model: nn.Module, train_args) -> torch.optim.Optimizer:
    return make_optimizer([p for p in model.parameters() if p.requires_grad], train_args)
