"""Typed configuration: one YAML file per run plus command-line overrides.

Keys are flat (``learning_rate: 2e-5``, ``lora_rank: 16``) and belong to one of the dataclasses below or to
``transformers.TrainingArguments``, so every Trainer knob (batch sizes, accumulation, scheduler, bf16,
gradient checkpointing, ``deepspeed``, ``report_to``, ``save_steps``, ``resume_from_checkpoint``, seed)
is reachable. Parsing goes through ``HfArgumentParser``: the YAML is turned into ``--key value`` tokens,
overrides are appended (the last one wins), and argparse does the typing. Unknown keys and bad values are
``ConfigError``s that name the key. A YAML file may start from another with ``base: other.yaml`` (a path
relative to the file): the base's keys apply first and the file's own keys override them, so recipes share
their hyperparameters instead of copying them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .config_files import DEFAULT_OUTPUT_DIR, load_yaml, override_tokens, split_config_argv, yaml_to_tokens
from .errors import ConfigError

__all__ = ["FINETUNING_TYPES", "BackboneArguments", "DataArguments", "ModelArguments", "TrainArguments", "config_to_dict",
           "load_yaml", "parse_config", "save_resolved_config", "split_config_argv"]

FINETUNING_TYPES = ("full", "lora", "qlora", "freeze", "ptuning")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "Hub name or local directory of the base (or SFT) model."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    trust_remote_code: bool = False
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa | flash_attention_2; None = transformers' default."})
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template (or a path to a file holding one) to use instead of the tokenizer's own."}
    )
    architecture_config: str | None = field(default=None, metadata={
        "help": "The model's config.json (shipped with a recipe): --estimate and --dry-run read it when the model is not a "
                "local directory yet, so they need no download."})


@dataclass
class DataArguments:
    dataset: list[str] = field(default=None, metadata={"help": "Local .json/.jsonl/.parquet/.csv files or datasets.load_dataset names."})
    dataset_ratios: list[float] | None = field(default=None, metadata={"help": "Mixing weights, one per dataset; None = concatenate."})
    dataset_split: str = field(default="train", metadata={"help": "Split read from datasets.load_dataset names."})
    eval_dataset: list[str] | None = field(default=None, metadata={"help": "Held-out files or names; else val_size is split off."})
    val_size: float = field(default=0.0, metadata={"help": "Fraction (<1) or count (>=1) of records held out for eval."})
    format: str = field(default="auto", metadata={"help": "Record format name from the registry, or auto-detect."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per example after templating; longer examples are truncated."})
    max_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training records (after mixing)."})
    packing: bool = field(default=False, metadata={"help": "Pack several examples into one max_length row (best-fit decreasing)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop bad records (and say how many) instead of stopping."})


@dataclass
class BackboneArguments:
    finetuning_type: str = field(default="lora", metadata={"help": "full | lora | qlora | freeze | ptuning"})
    # LoRA / QLoRA
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Module names, or all-linear."})
    # QLoRA: bitsandbytes quantization of the frozen base
    quantization_bit: int = field(default=4, metadata={"help": "4 (nf4/fp4) or 8 (LLM.int8)."})
    quantization_type: str = field(default="nf4", metadata={"help": "nf4 | fp4 (4-bit only)."})
    double_quantization: bool = field(default=True, metadata={"help": "Quantize the 4-bit quantization constants too."})
    # Freeze: train a few blocks, freeze the rest
    freeze_trainable_layers: int = field(default=2, metadata={"help": "N>0: the last N blocks train; N<0: the first |N|; 0: none."})
    freeze_trainable_modules: list[str] = field(
        default_factory=lambda: ["all"], metadata={"help": "Within the chosen blocks: 'all' or name patterns (mlp, self_attn, *proj)."}
    )
    freeze_extra_modules: list[str] | None = field(
        default=None, metadata={"help": "Name patterns outside the blocks that also train (embed_tokens, lm_head, norm)."}
    )
    # P-tuning
    ptuning_version: int = field(default=2, metadata={"help": "2: P-Tuning v2 deep prefix (PrefixTuning); 1: v1 prompt encoder."})
    num_virtual_tokens: int = 16
    prefix_projection: bool = field(default=False, metadata={"help": "v2: re-parameterize the prefix through an MLP."})
    encoder_hidden_size: int | None = field(default=None, metadata={"help": "Hidden size of the v2 projection or v1 encoder; None = model's."})
    prompt_encoder_type: str = field(default="MLP", metadata={"help": "v1 encoder: MLP | LSTM."})


@dataclass
class TrainArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus the few knobs tristage's own loop adds."""

    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the model, checkpoints, logs and resolved config go."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard | none (metrics.jsonl is always written)."})
    max_nonfinite_steps: int = field(default=5, metadata={
        "help": "Stop with an error after this many optimizer steps (PPO: iterations) in a row were skipped for a NaN/inf "
                "loss, gradient, reward or log-prob; 0 = never stop."})
    dry_run: bool = field(default=False, metadata={
        "help": "Validate config and data, build the tokenizer and the model's skeleton on the meta device (no weights), "
                "report, and exit before training."})
    save_weight_digest: bool = field(
        default=False, metadata={"help": "Each rank writes a digest of the full (gathered) weights it holds, to check consolidation."}
    )


class _Parser(HfArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line that names the key
        raise ConfigError(message)


def parse_config(argv: Sequence[str], dataclass_types: Sequence[type]) -> tuple:
    """YAML (``--config FILE``) + overrides -> one instance per dataclass type, in order."""
    config_file, overrides = split_config_argv(argv)
    values = load_yaml(config_file) if config_file else {}
    tokens = yaml_to_tokens(values) + override_tokens(overrides)
    parser = _Parser(dataclass_types, allow_abbrev=False)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=tokens, return_remaining_strings=True)
    except ConfigError as err:
        raise ConfigError(str(err), file=config_file) from None
    except (ValueError, TypeError) as err:  # raised by a dataclass __post_init__ (TrainingArguments checks)
        message = str(err).splitlines()[0]
        key = "deepspeed" if "deepspeed config" in message else None  # transformers' check of the deepspeed path
        raise ConfigError(message, key=key, file=config_file) from None
    unknown = [t[2:].split("=")[0] for t in remaining if t.startswith("--")]
    if remaining:
        raise ConfigError(f"unknown key(s): {', '.join(unknown) or ' '.join(remaining)}", file=config_file)
    return tuple(parsed)


def config_to_dict(*configs) -> dict[str, Any]:
    """The resolved flat config, in the form ``parse_config`` accepts back."""
    resolved: dict[str, Any] = {}
    for cfg in configs:
        values = cfg.to_dict() if isinstance(cfg, TrainingArguments) else dataclasses.asdict(cfg)
        init_fields = {f.name for f in dataclasses.fields(cfg) if f.init}
        resolved.update({k: v for k, v in values.items() if k in init_fields})
    if resolved.get("report_to") == []:
        resolved["report_to"] = "none"  # what parses back to an empty list
    return resolved


def save_resolved_config(output_dir: str, *configs, name: str = "tristage_config.yaml") -> Path:
    os.makedirs(output_dir, exist_ok=True)
    path = Path(output_dir) / name
    path.write_text(yaml.safe_dump(config_to_dict(*configs), sort_keys=True, allow_unicode=True), encoding="utf-8")
    return path
