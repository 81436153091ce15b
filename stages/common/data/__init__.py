"""Data for every stage: read the sources, parse and validate every record, mix, split, tokenize, pack.

    formats.py   the registry of record formats (SFT, preference, prompt) and their field checks
    sources.py   files, datasets, mixing, the held-out split
    tokenize.py  the chat template, labels on response tokens, reward-model and prompt inputs, packing
    collate.py   padding and collators

Every record is parsed before training starts, so bad data surfaces as one line naming the file, the record
number (1-based) and the field, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DataError
from .collate import collate_dpo, collate_preferences, collate_sft, pad_rows, right_pad
from .formats import (FORMATS, PreferenceExample, PromptExample, RecordFormat, SFTExample, as_prompt, detect_format,
                      register_format, with_system)
from .sources import LOCAL_EXTENSIONS, load_source_examples, mix_sources, parse_records, read_local_records, read_records, split_eval
from .tokenize import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, OVERLONG_MODES, Budget, TokenizeReport, pack_rows, render_chat,
                       render_exchange, tokenize_examples, tokenize_for_reward, tokenize_prompt_example, tokenize_sft_example)

__all__ = [  # what the stages use; the submodules hold the rest
    "Budget", "OVERLONG_MODES", "TokenizeReport", "DEFAULT_CHAT_TEMPLATE", "FORMATS", "IGNORE_INDEX", "LOCAL_EXTENSIONS", "PreferenceExample", "PromptExample", "RecordFormat",
    "SFTExample", "StageData", "as_prompt", "build_preference_data", "build_prompt_data", "build_sft_data", "build_stage_data",
    "collate_dpo", "collate_preferences", "collate_sft", "detect_format", "load_source_examples", "mix_sources", "pack_rows", "pad_rows",
    "parse_records", "read_local_records", "read_records", "register_format", "render_chat", "render_exchange", "right_pad",
    "split_eval", "tokenize_examples", "tokenize_for_reward", "tokenize_prompt_example", "tokenize_sft_example", "with_system",
]


@dataclass
class StageData:
    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    reports: dict[str, TokenizeReport] = field(default_factory=dict)  # "train", "eval": what tokenizing did

    def save_report(self, output_dir: str, name: str = "data_stats.json") -> None:
        """How many examples each split had, and how many were truncated, dropped or skipped."""
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / name).write_text(json.dumps({k: asdict(v) for k, v in self.reports.items()}, indent=2))


def build_stage_data(data_args, tokenizer, seed: int, kind: str) -> StageData:
    """Read, validate, mix, split and tokenize (``kind``: sft or preference); every error here comes
    before the model is loaded."""
    if not data_args.dataset:
        raise DataError("dataset", "no dataset given (dataset: path(s) or name(s))")
    per_source = load_source_examples(data_args.dataset, kind, data_args)
    examples = mix_sources(per_source, data_args.dataset_ratios, seed)
    if data_args.eval_dataset:
        eval_examples = [e for examples in load_source_examples(data_args.eval_dataset, kind, data_args) for e in examples]
    else:
        examples, eval_examples = split_eval(examples, data_args.val_size, seed)
    if data_args.max_samples:
        examples = examples[: data_args.max_samples]
    budget = Budget(data_args.max_length, data_args.overlong, data_args.overlong_response_share)
    train, train_report = tokenize_examples(examples, tokenizer, budget, data_args.skip_invalid, kind)
    evaluation, eval_report = tokenize_examples(eval_examples, tokenizer, budget, data_args.skip_invalid, kind)
    if not train:
        raise DataError(", ".join(data_args.dataset), f"no example is left to train on ({train_report.dropped} dropped as longer than "
                                                     f"max_length={data_args.max_length}, overlong: {data_args.overlong})")
    if data_args.packing and kind == "sft":
        train = pack_rows(train, data_args.max_length)
    return StageData(train=train, eval=evaluation, reports={"train": train_report, "eval": eval_report})


def build_sft_data(data_args, tokenizer, seed: int) -> StageData:
    return build_stage_data(data_args, tokenizer, seed, "sft")


def build_prompt_data(data_args, tokenizer, seed: int, max_prompt_length: int) -> StageData:
    """Prompts from any registry format, within max_prompt_length tokens (longer ones as ``overlong`` says)."""
    data_args = dataclasses.replace(data_args, max_length=max_prompt_length, packing=False)
    return build_stage_data(data_args, tokenizer, seed, "prompt")


def build_preference_data(data_args, tokenizer, seed: int) -> StageData:
    return build_stage_data(data_args, tokenizer, seed, "preference")

