"""The one registry of data formats, loading, validation and tokenization for every stage.

A *format* turns one raw record (a dict) into a canonical example, or raises ``RecordError`` naming the
field that is wrong. Formats are auto-detected per record set (from the first record's keys) unless
``format:`` names one. Every record is parsed before training starts, so bad data surfaces as one line
naming the file, the record number (1-based) and the field.

SFT formats (kind ``sft``) produce an ``SFTExample``: a list of ``{"role", "content"}`` messages (system,
then alternating user/assistant, ending with assistant), or a plain ``text``. Preference formats (kind
``preference``) produce a ``PreferenceExample``. Prompts (kind ``prompt``, for PPO and eval) come from
prompt-only records or from the prompts of any preference or SFT format.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import DataError, RecordError

LOCAL_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
IGNORE_INDEX = -100

# Used when a tokenizer has no chat template of its own (base models). Documented in the README:
#   [bos]{system}\n\n### User:\n{user}\n\n### Assistant:\n{assistant}[eos]\n\n### User:\n...
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


# --------------------------------------------------------------------------------------------- examples
@dataclass
class SFTExample:
    messages: list[dict[str, str]] | None = None  # system?, user, assistant, user, assistant, ...
    text: str | None = None  # plain text: every token is trained on
    prompt_field: str = "prompt"  # the record field a too-long prompt is reported against
    origin: tuple[str, int] = ("?", 0)  # (file, 1-based record number) for error messages


@dataclass
class PreferenceExample:
    prompt: list[dict[str, str]]  # system?, user, assistant, ..., user: the conversation before the responses
    chosen: str
    rejected: str
    margin: float = 0.0  # how much better chosen is; the Bradley-Terry loss asks for at least this gap
    prompt_field: str = "prompt"
    origin: tuple[str, int] = ("?", 0)


@dataclass
class PromptExample:
    """A conversation that ends with the user's turn: what PPO and eval generate a response to."""

    prompt: list[dict[str, str]]
    prompt_field: str = "prompt"
    origin: tuple[str, int] = ("?", 0)


# ---------------------------------------------------------------------------------------------- registry
@dataclass
class RecordFormat:
    name: str
    kind: str  # "sft" or "preference"
    detect: Callable[[dict], bool]
    parse: Callable[[dict], Any]
    description: str = ""


FORMATS: dict[str, RecordFormat] = {}


def register_format(name: str, kind: str, detect: Callable[[dict], bool], description: str = ""):
    def wrap(parse):
        FORMATS[name] = RecordFormat(name, kind, detect, parse, description)
        return parse

    return wrap


# Prompts can come from prompt-only records or from the prompts of preference or SFT data, tried in this order.
PROMPT_SOURCE_KINDS = ("prompt", "preference", "sft")


def kinds_for(kind: str) -> tuple[str, ...]:
    return PROMPT_SOURCE_KINDS if kind == "prompt" else (kind,)


def detect_format(record: Any, kind: str) -> RecordFormat | None:
    if not isinstance(record, dict):
        return None
    for source_kind in kinds_for(kind):
        for fmt in FORMATS.values():  # registration order is priority order
            if fmt.kind == source_kind and fmt.detect(record):
                return fmt
    return None


# ------------------------------------------------------------------------------------ field validation
def require_str(record: dict, key: str, *, allow_empty: bool = False, label: str | None = None) -> str:
    label = label or key
    if key not in record or record[key] is None:
        raise RecordError(label, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(label, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(label, "is empty")
    return value


def optional_str(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RecordError(key, f"must be a string, got {type(value).__name__}")
    return value


def check_conversation(messages: list[dict[str, str]], field_name: str, paths: list[str], final_role: str = "assistant") -> list[dict[str, str]]:
    """system?, then user/assistant alternating, ending with a non-empty ``final_role`` turn (a prompt ends
    with the user)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError(field_name, "has no user/assistant turns")
    offset = len(messages) - len(body)
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            article = "an" if expected == "assistant" else "a"
            raise RecordError(paths[i + offset], f"expected {article} {expected} turn here, got {message['role']!r}")
        if not message["content"].strip():
            what = "response" if expected == "assistant" else "prompt"
            raise RecordError(paths[i + offset], f"empty {what}")
    if body[-1]["role"] != final_role:
        raise RecordError(field_name, f"must end with {'an assistant' if final_role == 'assistant' else 'a user'} turn")
    return messages


def parse_turns(turns: Any, field_name: str, role_key: str, content_key: str, role_map: dict[str, str],
                final_role: str = "assistant") -> list[dict]:
    if not isinstance(turns, list):
        raise RecordError(field_name, f"must be a list of turns, got {type(turns).__name__}")
    messages, paths = [], []
    for i, turn in enumerate(turns):
        path = f"{field_name}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(path, f"must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        if role not in role_map:
            raise RecordError(f"{path}.{role_key}", f"unknown role {role!r} (expected one of {sorted(role_map)})")
        content = require_str(turn, content_key, allow_empty=True, label=f"{path}.{content_key}")
        messages.append({"role": role_map[role], "content": content})
        paths.append(f"{path}.{content_key}")
    if messages and any(m["role"] == "system" for m in messages[1:]):
        raise RecordError(field_name, "a system turn may only come first")
    return check_conversation(messages, field_name, paths, final_role)


CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant"}


# ---------------------------------------------------------------------------------------- SFT formats
@register_format("messages", "sft", lambda r: "messages" in r, "messages: [{role, content}, ...] (OpenAI / TRL chat)")
def parse_messages(record: dict) -> SFTExample:
    return SFTExample(messages=parse_turns(record["messages"], "messages", "role", "content", CHAT_ROLES), prompt_field="messages")


@register_format(
    "sharegpt", "sft", lambda r: "conversations" in r and "chosen" not in r, "conversations: [{from, value}, ...], optional system"
)
def parse_sharegpt(record: dict) -> SFTExample:
    messages = parse_turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    system = optional_str(record, "system")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return SFTExample(messages=messages, prompt_field="conversations")


@register_format(
    "alpaca", "sft", lambda r: "instruction" in r and "output" in r, "instruction, input, output; optional system and history"
)
def parse_alpaca(record: dict) -> SFTExample:
    instruction = require_str(record, "instruction")
    extra_input = record.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise RecordError("input", f"must be a string, got {type(extra_input).__name__}")
    output = require_str(record, "output")
    messages = []
    system = optional_str(record, "system")
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise RecordError(f"history[{i}]", "must be a pair of two non-empty strings [instruction, response]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return SFTExample(messages=messages, prompt_field="instruction")


@register_format("prompt_completion", "sft", lambda r: "prompt" in r and "completion" in r, "prompt, completion (strings)")
def parse_prompt_completion(record: dict) -> SFTExample:
    prompt = require_str(record, "prompt")
    completion = require_str(record, "completion")
    return SFTExample(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])


@register_format("text", "sft", lambda r: "text" in r, "text: plain text, every token trained (continued pre-training)")
def parse_text(record: dict) -> SFTExample:
    return SFTExample(text=require_str(record, "text"), prompt_field="text")


# ------------------------------------------------------------------------------------- prompt formats
@register_format("prompt", "prompt", lambda r: "prompt" in r and not {"completion", "chosen", "rejected"} & set(r),
                 "prompt (string or messages ending with a user turn), optional system: prompts only (PPO, eval)")
def parse_prompt(record: dict) -> PromptExample:
    if isinstance(record.get("prompt"), list):
        messages = parse_turns(record["prompt"], "prompt", "role", "content", CHAT_ROLES, final_role="user")
    else:
        messages = [{"role": "user", "content": require_str(record, "prompt")}]
    system = optional_str(record, "system")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return PromptExample(messages)


def as_prompt(example: Any) -> PromptExample:
    """The prompt of any parsed example: a preference pair's shared conversation, or an SFT conversation
    up to its last assistant turn."""
    if isinstance(example, PromptExample):
        return example
    if isinstance(example, PreferenceExample):
        return PromptExample(example.prompt, example.prompt_field, example.origin)
    if example.messages is None:
        raise RecordError(example.prompt_field, "plain text has no prompt to generate a response to")
    last_reply = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return PromptExample(example.messages[:last_reply], example.prompt_field, example.origin)


# --------------------------------------------------------------------------------- preference formats
def check_pair(chosen: str, rejected: str, chosen_field: str = "chosen", rejected_field: str = "rejected") -> None:
    if not chosen.strip():
        raise RecordError(chosen_field, "empty response")
    if not rejected.strip():
        raise RecordError(rejected_field, "empty response")
    if chosen.strip() == rejected.strip():
        raise RecordError(rejected_field, "identical to chosen: the pair says nothing")


def read_margin(record: dict) -> float:
    margin = record.get("margin", 0.0)
    if margin is None:
        return 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RecordError("margin", f"must be a number, got {type(margin).__name__}")
    return float(margin)


def response_text(value: Any, field_name: str) -> str:
    """A response given as a string, a {role/from, content/value} object, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content_key = "content" if "content" in value else "value"
        return require_str(value, content_key, allow_empty=True, label=f"{field_name}.{content_key}")
    if isinstance(value, list):
        replies = [m for m in value if isinstance(m, dict) and m.get("role", m.get("from")) in ("assistant", "gpt")]
        if len(replies) != 1 or len(value) != 1:
            raise RecordError(field_name, "a message list here must hold exactly one assistant message")
        return response_text(replies[0], f"{field_name}[0]")
    raise RecordError(field_name, f"must be a string or a message, got {type(value).__name__}")


def split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """Two full conversations -> (shared prompt, last chosen reply, last rejected reply), as in HH-RLHF and
    TRL's implicit-prompt preference data."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if shared == len(chosen) or shared == len(rejected):
        raise RecordError("rejected", "identical to chosen: the pair says nothing")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if len(side) != shared + 1 or side[-1]["role"] != "assistant":
            raise RecordError(name, "must differ from the other side only in its final assistant turn")
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError("chosen", "the shared conversation must end with a human/user turn")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


@register_format("sharegpt_ranking", "preference", lambda r: "conversations" in r and "chosen" in r and "rejected" in r,
                 "conversations: [{from, value}, ...] ending with the human turn; chosen / rejected: {from: gpt, value}")
def parse_sharegpt_ranking(record: dict) -> PreferenceExample:
    prompt = parse_turns(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, final_role="user")
    system = optional_str(record, "system")
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    chosen, rejected = response_text(record["chosen"], "chosen"), response_text(record["rejected"], "rejected")
    check_pair(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, read_margin(record), prompt_field="conversations")


@register_format("prompt_chosen_rejected", "preference", lambda r: "prompt" in r and "chosen" in r and "rejected" in r,
                 "prompt (string or messages), chosen, rejected (strings or one assistant message), optional system, margin "
                 "(TRL explicit-prompt preference data; DeepSpeed-Chat local json)")
def parse_prompt_chosen_rejected(record: dict) -> PreferenceExample:
    raw_prompt = record["prompt"]
    if isinstance(raw_prompt, list):
        prompt = parse_turns(raw_prompt, "prompt", "role", "content", CHAT_ROLES, final_role="user")
    else:
        prompt = [{"role": "user", "content": require_str(record, "prompt")}]
    system = optional_str(record, "system")
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    chosen, rejected = response_text(record["chosen"], "chosen"), response_text(record["rejected"], "rejected")
    check_pair(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, read_margin(record))


HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_transcript(text: str, field_name: str) -> list[dict]:
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise RecordError(field_name, "text before the first '\\n\\nHuman:' turn")
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if not messages:
        raise RecordError(field_name, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    return messages


@register_format("hh_rlhf", "preference",
                 lambda r: "prompt" not in r and isinstance(r.get("chosen"), str) and "\n\nHuman:" in r["chosen"],
                 "chosen / rejected: full Anthropic HH-RLHF transcripts; the shared turns become the prompt")
def parse_hh_rlhf(record: dict) -> PreferenceExample:
    chosen = parse_hh_transcript(require_str(record, "chosen"), "chosen")
    rejected = parse_hh_transcript(require_str(record, "rejected"), "rejected")
    prompt, chosen_reply, rejected_reply = split_shared_prefix(chosen, rejected)
    check_pair(chosen_reply, rejected_reply)
    return PreferenceExample(prompt, chosen_reply, rejected_reply, read_margin(record), prompt_field="chosen")


@register_format("chosen_rejected_messages", "preference",
                 lambda r: "prompt" not in r and isinstance(r.get("chosen"), list) and isinstance(r.get("rejected"), list),
                 "chosen / rejected: full conversations (messages); the shared turns become the prompt (TRL implicit prompt)")
def parse_chosen_rejected_messages(record: dict) -> PreferenceExample:
    chosen = parse_turns(record["chosen"], "chosen", "role", "content", CHAT_ROLES)
    rejected = parse_turns(record["rejected"], "rejected", "role", "content", CHAT_ROLES)
    prompt, chosen_reply, rejected_reply = split_shared_prefix(chosen, rejected)
    check_pair(chosen_reply, rejected_reply)
    return PreferenceExample(prompt, chosen_reply, rejected_reply, read_margin(record), prompt_field="chosen")


# ------------------------------------------------------------------------------------------ loading
def is_local_file(source: str) -> bool:
    """A file we read ourselves (for exact record numbers); directories and names go to datasets.load_dataset."""
    if os.path.isdir(os.path.expanduser(source)):
        return False
    return source.lower().endswith(LOCAL_EXTENSIONS) or source.startswith((".", "/", "~")) or os.path.exists(source)


def read_local_records(path: str) -> list[Any]:
    """Records of a local file; errors name the file and the line or record."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(path, "no such file")
    suffix = file.suffix.lower()
    if suffix in (".parquet", ".csv"):
        import datasets

        try:
            loaded = datasets.Dataset.from_parquet(str(file)) if suffix == ".parquet" else datasets.Dataset.from_csv(str(file))
        except Exception as err:  # the libraries raise many types; the user needs the file and the reason
            raise DataError(path, f"cannot read {suffix[1:]}: {str(err).splitlines()[0]}") from None
        return loaded.to_list()
    if suffix not in (".json", ".jsonl"):
        raise DataError(path, f"unknown file type {suffix!r} (expected one of {', '.join(LOCAL_EXTENSIONS)})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = file.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(path, f"not UTF-8 text (bad byte at line {line})") from None
    if not text.strip():
        raise DataError(path, "is empty")
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(path, f"broken JSON on line {number}: {err.msg} (column {err.colno})", record=len(records) + 1) from None
        return records
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, f"broken JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
        loaded = loaded["data"]
    if not isinstance(loaded, list):
        raise DataError(path, "a .json data file must hold a list of records (or {\"data\": [...]})")
    return loaded


def read_records(source: str, split: str = "train") -> list[Any]:
    if is_local_file(source):
        return read_local_records(source)
    import datasets

    try:
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as err:  # hub / loader errors: name the source
        raise DataError(source, f"cannot load with datasets.load_dataset (split {split!r}): {str(err).splitlines()[0]}") from None


def parse_records(source: str, records: list[Any], kind: str, format_name: str = "auto", skip_invalid: bool = False) -> list[Any]:
    """Parse and validate every record; raise on the first bad one, or drop bad ones with skip_invalid."""
    if not records:
        raise DataError(source, "holds no records")
    if format_name == "auto":
        if not isinstance(records[0], dict):
            raise DataError(source, f"must be an object of fields, got {type(records[0]).__name__}", record=1, field="<record>")
        fmt = detect_format(records[0], kind)
        if fmt is None:
            keys = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
            known = ", ".join(f.name for f in FORMATS.values() if f.kind in kinds_for(kind))
            raise DataError(source, f"unknown format: keys {keys} match none of the {kind} formats ({known})", record=1)
    else:
        fmt = FORMATS.get(format_name)
        if fmt is None or fmt.kind not in kinds_for(kind):
            known = ", ".join(f.name for f in FORMATS.values() if f.kind in kinds_for(kind))
            raise DataError(source, f"unknown {kind} format {format_name!r} (known: {known})")
    examples, skipped = [], 0
    for number, record in enumerate(records, start=1):
        try:
            if not isinstance(record, dict):
                raise RecordError("<record>", f"must be an object, got {type(record).__name__}")
            try:
                example = fmt.parse(record)
            except KeyError as missing:  # a later record lacks a key the file's format (from record 1) needs
                raise RecordError(str(missing.args[0]), f"missing (the file's records are {fmt.name})") from None
            if kind == "prompt":
                example = as_prompt(example)
        except RecordError as err:
            if skip_invalid:
                skipped += 1
                continue
            raise DataError(source, err.message, record=number, field=err.field) from None
        example.origin = (source, number)
        examples.append(example)
    if skipped:
        print(f"[tristage] {source}: skipped {skipped} invalid record(s) of {len(records)} (skip_invalid)")
    if not examples:
        raise DataError(source, f"no valid records left (skipped {skipped})")
    return examples


def mix_sources(per_source: list[list[Any]], ratios: list[float] | None, seed: int) -> list[Any]:
    """Concatenate, or draw from each source in proportion to its ratio.

    With ratios the mixture has as many examples as all sources together; source i contributes
    ``round(ratio_i / sum(ratios) * total)`` examples: a shuffled subset when it has more, whole repeats
    plus a shuffled remainder when it has fewer (upsampling).
    """
    if ratios is None:
        return [example for examples in per_source for example in examples]
    if len(ratios) != len(per_source):
        raise DataError("dataset_ratios", f"{len(ratios)} ratio(s) for {len(per_source)} dataset(s)")
    if any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError("dataset_ratios", "ratios must be non-negative and not all zero")
    rng = random.Random(seed)
    total = sum(len(examples) for examples in per_source)
    mixed = []
    for examples, ratio in zip(per_source, ratios):
        want = round(ratio / sum(ratios) * total)
        repeats, remainder = divmod(want, len(examples))
        shuffled = examples[:]
        rng.shuffle(shuffled)
        mixed += examples * repeats + shuffled[:remainder]
    rng.shuffle(mixed)
    return mixed


def split_eval(examples: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    if val_size <= 0:
        return examples, []
    count = int(val_size) if val_size >= 1 else max(1, math.floor(len(examples) * val_size))
    if count >= len(examples):
        raise DataError("val_size", f"holds out {count} of {len(examples)} records, leaving none to train on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def load_source_examples(sources: Iterable[str], kind: str, data_args) -> list[list[Any]]:
    """Parsed examples, one list per source."""
    return [
        parse_records(source, read_records(source, data_args.dataset_split), kind, data_args.format, data_args.skip_invalid)
        for source in sources
    ]


# ------------------------------------------------------------------------------------- tokenization
def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (its end-of-turn included).

    A turn's span runs from the end of the conversation before it (rendered with the generation prompt)
    to the end of the conversation through it. This needs the template to render prefixes as prefixes,
    which every common template does; a template that does not is reported, not silently mis-masked.
    """
    full = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render conversation prefixes as prefixes; cannot mask prompts")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_sft_example(example: SFTExample, tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels; labels are IGNORE_INDEX everywhere but on response tokens."""
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    text, spans = assistant_char_spans(tokenizer, example.messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, _end) in enumerate(offsets):
        if any(span_start <= start < span_end for span_start, span_end in spans):
            labels[position] = ids[position]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        first_response = next((p for p, (s, _) in enumerate(offsets) if any(a <= s < b for a, b in spans)), len(offsets))
        raise RecordError(
            example.prompt_field, f"the prompt takes {first_response} tokens, max_length is {max_length}: no response token is left"
        )
    return {"input_ids": ids, "labels": labels}


def render_exchange(tokenizer, prompt: list[dict], response: str) -> str:
    """The text a reward model scores: the prompt and the response through the chat template."""
    return render_chat(tokenizer, prompt + [{"role": "assistant", "content": response}])


def tokenize_for_reward(tokenizer, prompt: list[dict], response: str, max_length: int) -> list[int]:
    """Right-truncated to max_length: the reward is read at the last kept token."""
    return tokenizer(render_exchange(tokenizer, prompt, response), add_special_tokens=False)["input_ids"][:max_length]


def tokenize_preference_example(example: PreferenceExample, tokenizer, max_length: int) -> dict:
    chosen = tokenize_for_reward(tokenizer, example.prompt, example.chosen, max_length)
    rejected = tokenize_for_reward(tokenizer, example.prompt, example.rejected, max_length)
    if chosen == rejected:
        raise RecordError(example.prompt_field, f"chosen and rejected are identical within max_length={max_length} tokens "
                                                "(the prompt is too long)")
    return {"chosen_ids": chosen, "rejected_ids": rejected, "margin": example.margin}


def tokenize_prompt_example(example: PromptExample, tokenizer, max_length: int) -> dict:
    """The prompt through the chat template with the generation prompt; a longer prompt keeps its last
    max_length tokens (the question and the cue to answer matter more than the start of a long history)."""
    ids = tokenizer(render_chat(tokenizer, example.prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    return {"prompt_ids": ids[-max_length:], "prompt": example.prompt}


TOKENIZERS = {"sft": tokenize_sft_example, "preference": tokenize_preference_example, "prompt": tokenize_prompt_example}


def tokenize_examples(examples: list, tokenizer, max_length: int, skip_invalid: bool, kind: str = "sft") -> list[dict]:
    tokenize = TOKENIZERS[kind]
    rows, skipped = [], 0
    for example in examples:
        try:
            rows.append(tokenize(example, tokenizer, max_length))
        except RecordError as err:
            if skip_invalid:
                skipped += 1
                continue
            raise DataError(example.origin[0], err.message, record=example.origin[1], field=err.field) from None
    if skipped:
        print(f"[tristage] skipped {skipped} record(s) that do not fit max_length={max_length} (skip_invalid)")
    return rows


def pack_rows(rows: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing (TRL's pack_dataset); each row keeps its examples' lengths."""
    import datasets
    from trl.data_utils import pack_dataset

    packed = pack_dataset(datasets.Dataset.from_list(rows), seq_length=max_length, strategy="bfd")
    return [{"input_ids": r["input_ids"], "labels": r["labels"], "seq_lengths": r["seq_lengths"]} for r in packed.to_list()]


@dataclass
class StageData:
    train: list[dict]
    eval: list[dict] = field(default_factory=list)


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
    train = tokenize_examples(examples, tokenizer, data_args.max_length, data_args.skip_invalid, kind)
    evaluation = tokenize_examples(eval_examples, tokenizer, data_args.max_length, data_args.skip_invalid, kind)
    if data_args.packing and kind == "sft":
        train = pack_rows(train, data_args.max_length)
    return StageData(train=train, eval=evaluation)


def build_sft_data(data_args, tokenizer, seed: int) -> StageData:
    return build_stage_data(data_args, tokenizer, seed, "sft")


def build_prompt_data(data_args, tokenizer, seed: int, max_prompt_length: int) -> StageData:
    """Prompts from any registry format, left-truncated to max_prompt_length tokens."""
    data_args = dataclasses.replace(data_args, max_length=max_prompt_length, packing=False)
    return build_stage_data(data_args, tokenizer, seed, "prompt")


def build_preference_data(data_args, tokenizer, seed: int) -> StageData:
    return build_stage_data(data_args, tokenizer, seed, "preference")


# ------------------------------------------------------------------------------------------ batching
def collate_sft(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Packed rows get position ids that restart per example and no attention mask,
    from which transformers builds a block-diagonal causal mask (no attention across examples)."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
    if "seq_lengths" not in rows[0]:
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        lengths = list(row["seq_lengths"]) + [width - len(row["input_ids"])]  # the padding is one more segment
        position_ids[i] = torch.cat([torch.arange(n) for n in lengths if n > 0])
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
    return input_ids, attention_mask


def collate_preferences(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One forward for both sides: the first half of the batch is the chosen responses, the second the rejected."""
    input_ids, attention_mask = right_pad([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": torch.tensor([float(r["margin"]) for r in rows])}
