"""Merge a LoRA/QLoRA adapter into its base model: a standalone model that plain
``AutoModelForCausalLM.from_pretrained`` (or ``AutoModelForSequenceClassification`` for a reward model) loads."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .errors import ConfigError, RunError

AUTO_CLASS_BY_TASK = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification"}


def refuse_non_finite(model: torch.nn.Module, source: str) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RunError(f"{source}: merged weights hold NaN/inf (first: {bad[0]}); nothing exported")


def export_merged(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str = "float32") -> Path:
    import transformers
    from peft import PeftConfig, PeftModel

    from .loading import POLICY_STACK_FILE, load_policy

    if (Path(adapter_dir) / POLICY_STACK_FILE).is_file():  # a PPO adapter stack (SFT adapter + PPO adapter)
        merged = load_policy(adapter_dir, dtype=getattr(torch, dtype), quantization=None).merge_and_unload()
        refuse_non_finite(merged, adapter_dir)
        merged.save_pretrained(output_dir)
        transformers.AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
        return Path(output_dir)
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"{adapter_dir} holds no peft adapter (adapter_config.json); a full model needs no export", key="adapter")
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    if peft_config.is_prompt_learning:
        raise ConfigError(f"{peft_config.peft_type} adapters (P-tuning) add virtual tokens at run time and cannot be merged into "
                          "weights; load them with PeftModel.from_pretrained", key="adapter")
    task = json.loads(config_file.read_text()).get("task_type") or "CAUSAL_LM"
    auto_class = getattr(transformers, AUTO_CLASS_BY_TASK.get(task, "AutoModelForCausalLM"))
    base_path = base or peft_config.base_model_name_or_path
    # QLoRA adapters merge into an unquantized base: the 4-bit base was only a memory trick for training.
    model = auto_class.from_pretrained(base_path, dtype=getattr(torch, dtype), **({"num_labels": 1} if task == "SEQ_CLS" else {}))
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    refuse_non_finite(merged, adapter_dir)
    merged.save_pretrained(output_dir)
    transformers.AutoTokenizer.from_pretrained(adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_path
                                               ).save_pretrained(output_dir)
    return Path(output_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tristage export", description="Merge a peft adapter into a standalone model.")
    parser.add_argument("--adapter", required=True, help="directory of the trained adapter (a stage's output_dir)")
    parser.add_argument("--out", required=True, help="where the merged model goes")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    out = export_merged(args.adapter, args.out, args.base, args.dtype)
    print(f"[tristage] merged model saved to {out}")
    return 0
