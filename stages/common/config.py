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
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .config_files import DEFAULT_OUTPUT_DIR, load_yaml, override_tokens, split_config_argv, yaml_to_tokens
from .data.tokenize import OVERLONG_MODES
from .errors import ConfigError
from .optimizers import OPTIMIZERS, make_optimizer, optimizer_name
from .tracking import TRACKER_PACKAGES

__all__ = ["FINETUNING_TYPES", "BackboneArguments", "DataArguments", "ModelArguments", "TrainArguments", "config_to_dict",
           "load_yaml", "parse_config", "save_resolved_config", "split_config_argv"]

FINETUNING_TYPES = ("full", "lora", "qlora", "freeze", "ptuning")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "Hub name or local directory of the base (or SFT) model."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    trust_remote_code: bool = False
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa | flash_attention_2; None = transformers' default, eager for a checkpoint that soft-caps attention (Gemma2)."})
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
    overlong: str = field(default="truncate", metadata={
        "help": "An example longer than max_length (a prompt longer than max_prompt_length): truncate (cut the prompt from "
                "the left, keeping the system prompt, and the response from the right), drop, or error. The counts are printed "
                "and saved to <output_dir>/data_stats.json."})
    overlong_response_share: float = field(default=0.5, metadata={
        "help": "truncate: the response keeps at least this share of max_length (more when the prompt leaves room)."})

    def __post_init__(self):
        if self.overlong not in OVERLONG_MODES:
            raise ConfigError(f"must be one of {', '.join(OVERLONG_MODES)}", key="overlong")
        if not 0.0 < self.overlong_response_share < 1.0:
            raise ConfigError("must be between 0 and 1", key="overlong_response_share")
        if self.max_length < 2:
            raise ConfigError("must be >= 2", key="max_length")


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


TRAINER_KEYS = frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
REPORTERS = ("tensorboard", "wandb", "mlflow", "none")

# The transformers.TrainingArguments keys every training stage honors; a stage's own TrainArguments adds its few. Any
# other Trainer key in a config is refused, naming it: tristage drives its own loop, and a key it does not use must
# not look as if it did something.
HONORED_TRAINER_KEYS = frozenset({
    "output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "average_tokens_across_devices", "bf16", "fp16", "tf32", "use_cpu", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs", "deepspeed",
    "logging_strategy", "logging_steps", "disable_tqdm", "report_to", "run_name", "project", "save_strategy",
    "save_steps", "save_total_limit", "save_only_model", "resume_from_checkpoint", "seed", "local_rank",
})
EVAL_TRAINER_KEYS = frozenset({"eval_strategy", "eval_steps", "load_best_model_at_end", "metric_for_best_model",
                               "greater_is_better"})  # the stages with an eval split (SFT, RM)


@dataclass
class TrainArguments(TrainingArguments):
    """``transformers.TrainingArguments`` plus the few knobs tristage's own loop adds. ``honored`` lists the Trainer
    keys this stage uses (the others are refused when a config sets them)."""

    honored: ClassVar[frozenset[str]] = HONORED_TRAINER_KEYS
    eval_metrics: ClassVar[tuple[str, ...]] = ()  # what metric_for_best_model may name (a stage with an eval split says)

    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "Where the model, checkpoints, logs and resolved config go."})
    optim: str = field(default="adamw_torch", metadata={
        "help": f"One of {', '.join(OPTIMIZERS)} (bitsandbytes' 8-bit and paged optimizers for QLoRA). Refused with a DeepSpeed "
                "config that has its own optimizer section."})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "tensorboard, wandb, mlflow (a list for several) or none; metrics.jsonl is always written."})
    project: str = field(default="tristage", metadata={"help": "The wandb project / mlflow experiment the run is logged under."})
    max_nonfinite_steps: int = field(default=5, metadata={
        "help": "Stop with an error after this many optimizer steps (PPO: iterations) in a row were skipped for a NaN/inf "
                "loss, gradient, reward or log-prob; 0 = never stop."})
    dry_run: bool = field(default=False, metadata={
        "help": "Validate config and data, build the tokenizer and the model's skeleton on the meta device (no weights), "
                "report, and exit before training."})
    save_weight_digest: bool = field(
        default=False, metadata={"help": "Each rank writes a digest of the full (gathered) weights it holds, to check consolidation."}
    )

    def __post_init__(self):
        if optimizer_name(self) not in OPTIMIZERS:  # before transformers' own check, whose list holds ones we do not build
            raise ConfigError(f"must be one of {', '.join(OPTIMIZERS)}", key="optim")
        super().__post_init__()
        try:
            make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], self)  # wrong optim_args fail now, not after loading
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.optim_args!r} does not suit {optimizer_name(self)}: {err}", key="optim_args") from None
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            raise ConfigError(f"{unknown[0]!r} is not one of {', '.join(REPORTERS)}", key="report_to")
        for tracker, package in TRACKER_PACKAGES.items():
            if tracker in self.report_to and importlib.util.find_spec(package) is None:
                raise ConfigError(f"{tracker} needs the {package} package: pip install '{package}' (or tristage[tracking])",
                                  key="report_to")
        for key, allowed in (("logging_strategy", ("steps",)), ("save_strategy", ("steps", "no")), ("eval_strategy", ("steps", "no"))):
            value = str(getattr(getattr(self, key), "value", getattr(self, key)))
            if value not in allowed:
                raise ConfigError(f"{value!r} is not supported: use {' or '.join(allowed)} (tristage counts optimizer steps)", key=key)
        if self.load_best_model_at_end or self.metric_for_best_model:
            metric = (self.metric_for_best_model or "loss").removeprefix("eval_")
            if metric not in self.eval_metrics:
                raise ConfigError(f"{metric!r} is not one of this stage's eval metrics ({', '.join(self.eval_metrics)})",
                                  key="metric_for_best_model")
        if self.load_best_model_at_end:
            if self.save_only_model:
                raise ConfigError("load_best_model_at_end loads a whole checkpoint: remove save_only_model", key="save_only_model")
        if not self.average_tokens_across_devices:
            raise ConfigError("tristage always averages the loss over every token of a step, across devices",
                              key="average_tokens_across_devices")

    @classmethod
    def refuse_unused(cls, keys: set[str]) -> None:
        """``keys``: what the config and overrides set. A Trainer key this stage does not use is an error."""
        unused = sorted((keys & TRAINER_KEYS) - cls.honored)
        if unused:
            raise ConfigError("a transformers Trainer setting this stage does not use (tristage runs its own loop; the README's "
                              "Configuration section lists the keys each stage honors): remove it", key=unused[0])


ENUM_KEYS = {"SchedulerType": "lr_scheduler_type", "SaveStrategy": "save_strategy", "HubStrategy": "hub_strategy"}


class _Parser(HfArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line that names the key
        raise ConfigError(message)


def parse_config(argv: Sequence[str], dataclass_types: Sequence[type]) -> tuple:
    """YAML (``--config FILE``) + overrides -> one instance per dataclass type, in order."""
    config_file, overrides = split_config_argv(argv)
    values = load_yaml(config_file) if config_file else {}
    tokens = yaml_to_tokens(values) + override_tokens(overrides)
    written = {t[2:].split("=")[0] for t in tokens if t.startswith("--")}
    for config_type in dataclass_types:  # before parsing: transformers' own checks of a refused key would speak first
        if issubclass(config_type, TrainArguments):
            try:
                config_type.refuse_unused(written)
            except ConfigError as err:
                raise ConfigError(str(err), file=config_file) from None
    parser = _Parser(dataclass_types, allow_abbrev=False)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=tokens, return_remaining_strings=True)
    except ConfigError as err:
        raise ConfigError(str(err), file=config_file) from None
    except (ValueError, TypeError) as err:  # raised by a dataclass __post_init__ (TrainingArguments checks)
        message = str(err).splitlines()[0]
        # transformers' checks of the deepspeed path and of its enumerations name no key: name it
        key = "deepspeed" if "deepspeed config" in message else next(
            (k for enum, k in ENUM_KEYS.items() if f"valid {enum}" in message), None)
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
        if isinstance(cfg, TrainArguments):  # only the Trainer keys the stage uses, so the file parses back
            init_fields = {name for name in init_fields if name not in TRAINER_KEYS or name in cfg.honored}
        resolved.update({k: v for k, v in values.items() if k in init_fields})
    if resolved.get("report_to") == []:
        resolved["report_to"] = "none"  # what parses back to an empty list
    return resolved


def save_resolved_config(output_dir: str, *configs, name: str = "tristage_config.yaml") -> Path:
    os.makedirs(output_dir, exist_ok=True)
    path = Path(output_dir) / name
    path.write_text(yaml.safe_dump(config_to_dict(*configs), sort_keys=True, allow_unicode=True), encoding="utf-8")
    return path
