"""Loading what the stages saved, for inference (eval, collect, scoring, PPO's frozen roles): a full model, a base
+ adapter, or a base + adapter stack (PPO with LoRA), on the device and in the dtype asked for, QLoRA adapters on
the same 4-bit base they were trained on."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .backbone import attention_kwargs, one_cpu_kernel, quantization_config
from .config import BackboneArguments
from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def inference_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that has it (half the memory, tensor cores), else float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def check_device_and_dtype(device: str, dtype: str, device_key: str = "device", dtype_key: str = "dtype") -> None:
    """Config-time checks of the ``device`` and ``dtype`` keys (their names in the stage's config)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"must be auto or one of {', '.join(DTYPES)}", key=dtype_key)
    kind, _, index = device.partition(":")
    if device != "auto" and (kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index)):
        raise ConfigError(f"must be {DEVICE_CHOICES}", key=device_key)


def placement(device: torch.device | None) -> dict:
    """from_pretrained arguments that load the weights straight onto ``device`` (None: where transformers puts them)."""
    return {} if device is None else {"device_map": {"": device}}


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


def attach_adapters(model: nn.Module, adapters: list[tuple[str, str]], trainable: bool = False,
                    causal_lm: bool = True) -> nn.Module:
    """Load adapters onto a base model and make them all active (stacked: their deltas add up). ``causal_lm=False``: a
    critic or reward model starting from the SFT policy's CAUSAL_LM adapter: peft's plain PeftModel wraps it (its
    causal-LM class needs generation methods, its classification class a saved score head)."""
    from peft import PeftConfig, PeftModel

    (first, first_dir), rest = adapters[0], adapters[1:]
    config = PeftConfig.from_pretrained(first_dir)
    if not causal_lm:
        config.task_type = None
    model = PeftModel.from_pretrained(model, first_dir, adapter_name=first, is_trainable=trainable, config=config)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name, is_trainable=trainable)
    model.base_model.set_adapter([name for name, _ in adapters])
    if not trainable:
        model.requires_grad_(False)
    return model


def load_policy(path: str, dtype: torch.dtype = torch.float32, quantization="trained", trust_remote_code: bool = False,
                device: torch.device | None = None) -> nn.Module:
    """A causal LM as a stage saved it: a full model, a base + adapter, or a base + adapter stack (PPO with
    LoRA), with its weights in ``dtype`` on ``device``. Adapters stay unmerged; QLoRA adapters load onto the same
    4-bit base they were trained on."""
    from transformers import AutoModelForCausalLM

    base_path = adapter_base_path(path)
    if base_path is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     quantization_config=None if quantization == "trained" else quantization,
                                                     **placement(device), **attention_kwargs(path, None, trust_remote_code))
        one_cpu_kernel(model)
        return model
    if quantization == "trained":
        quantization = trained_quantization(path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, quantization_config=quantization,
                                                 trust_remote_code=trust_remote_code, **placement(device),
                                                 **attention_kwargs(base_path, None, trust_remote_code))
    one_cpu_kernel(model)  # score with the kernel training used
    return attach_adapters(model, policy_adapters(path))
