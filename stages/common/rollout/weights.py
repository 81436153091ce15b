"""The weights a policy computes with, streamed as a plain checkpoint of its architecture names them: what a vLLM
engine loads after every update.

Module by module, so the training side never holds a second whole copy:
- full fine-tuning: each parameter as it is;
- LoRA, and stacked adapters (an SFT adapter under the PPO adapter, the shared backbone's actor): W + Σ ΔW over the
  adapters active on that layer (peft's ``get_delta_weight``: scale · B · A), computed one layer at a time. Merged
  weights rather than vLLM's own LoRA: one engine serves any adapter stack (and QLoRA's dequantized base), and
  decoding runs at the base model's speed with no per-token adapter matmuls;
- QLoRA: the 4-bit (or 8-bit) base dequantized (what bitsandbytes computes with) plus the adapters' ΔW;
- ZeRO-3: each block (a decoder layer, the embeddings, ...) gathered while its tensors stream, then released.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from ..errors import ConfigError

Gather = Callable[[list[nn.Parameter]], ContextManager]


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _active_adapters(layer: nn.Module) -> list[str]:
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return []  # adapters off (the reference), or already merged into the base weight
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _base_weight(module: nn.Module) -> torch.Tensor:
    """A linear's weight as it computes with it: bitsandbytes' 4-bit and 8-bit weights dequantized."""
    from peft.utils.integrations import dequantize_module_weight

    if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes' repacking for its CPU kernel has only a lossy inverse; our loader turns it off (one_cpu_kernel)
        raise RuntimeError("a 4-bit weight repacked for bitsandbytes' CPU kernel cannot be dequantized exactly; load the "
                           "model through stages.common.backbone.load_pretrained (or call one_cpu_kernel on it)")
    return dequantize_module_weight(module).detach()


def _lora_tensors(prefix: str, layer: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    base = layer.base_layer
    weight = _base_weight(base)
    adapters = _active_adapters(layer)
    if adapters:
        weight = weight.float() + sum(layer.get_delta_weight(name).float() for name in adapters)
    yield prefix + "weight", weight
    if getattr(base, "bias", None) is not None:
        yield prefix + "bias", base.bias.detach()


def _own_tensors(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in module.named_parameters(recurse=False):
        if name == "weight" and type(param).__name__ in ("Params4bit", "Int8Params"):
            yield prefix + name, _base_weight(module)
        else:
            yield prefix + name, param.detach()


def _unwrap(module: nn.Module) -> nn.Module:
    """peft's ModulesToSaveWrapper (a module trained whole beside the adapters): the copy in use."""
    if not (hasattr(module, "original_module") and hasattr(module, "modules_to_save")):
        return module
    active = module.active_adapters if hasattr(module, "active_adapters") else [module.active_adapter]
    names = [name for name in active if name in module.modules_to_save]
    return module.original_module if getattr(module, "disable_adapters", False) or not names else module.modules_to_save[names[0]]


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    module = _unwrap(module)
    if _is_lora_layer(module):
        yield from _lora_tensors(prefix, module)
        return
    yield from _own_tensors(prefix, module)
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.")


def _blocks(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, bool]]:
    """(prefix, module, whole): the units gathered together: each element of a ModuleList (a decoder layer) whole, and
    elsewhere a module's own parameters (whole=False: its children are units of their own)."""
    module = _unwrap(module)
    if isinstance(module, nn.ModuleList) or _is_lora_layer(module):
        for name, child in (module.named_children() if isinstance(module, nn.ModuleList) else [("", module)]):
            yield (f"{prefix}{name}." if name else prefix), child, True
        return
    yield prefix, module, False
    for name, child in module.named_children():
        yield from _blocks(child, f"{prefix}{name}.")


def policy_weights(model: nn.Module, gather: Gather | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight ``model`` computes with, under the names of its architecture's checkpoint
    (``model.layers.0.self_attn.q_proj.weight``): a transformers causal LM, bare or wrapped by peft. ``gather``: a
    context that makes a list of (ZeRO-3 partitioned) parameters whole; tensors gathered by it are copied before it
    releases them."""
    if getattr(getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None), None), "is_prompt_learning", False):
        raise ConfigError("a prompt-learning adapter (P-tuning) adds virtual tokens a vLLM engine has no place for; use "
                          "rollout_engine: hf", key="rollout_engine")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = bool(getattr(causal_lm.config.get_text_config(), "tie_word_embeddings", False))
    for prefix, block, whole in _blocks(causal_lm):
        params = list(block.parameters(recurse=whole))
        with (gather(params) if gather is not None and params else nullcontext()):
            tensors = _walk(block, prefix) if whole else _own_tensors(prefix, block)
            for name, tensor in tensors:
                if tied and name.endswith("lm_head.weight"):
                    continue  # the engine ties it to the embeddings itself
                yield name, tensor.clone() if gather is not None else tensor
