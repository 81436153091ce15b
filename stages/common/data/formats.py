"""The one registry of record formats. A *format* turns one raw record (a dict) into a canonical example, or
raises ``RecordError`` naming the field that is wrong; formats are detected from a record's keys (registration
order is priority order) unless ``format:`` names one.

SFT formats (kind ``sft``) produce an ``SFTExample``: a list of ``{"role", "content"}`` messages (system,
then alternating user/assistant, ending with assistant), or a plain ``text``. Preference formats (kind
``preference``) produce a ``PreferenceExample``. Prompts (kind ``prompt``, for PPO and eval) come from
prompt-only records or from the prompts of any preference or SFT format.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RecordError


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
    tie: bool = False  # annotators found neither better: the loss reads it as p = 0.5 (collect's `tie: true` records)
    prompt_field: str = "prompt"
    origin: tuple[str, int] = ("?", 0)


@dataclass
class PromptExample:
    """A conversation that ends with the user's turn: what PPO and eval generate a response to."""

    prompt: list[dict[str, str]]
    prompt_field: str = "prompt"
    origin: tuple[str, int] = ("?", 0)
    reference: str | None = None  # a reference answer (eval's BLEU / ROUGE-L): a `reference` field or SFT data's last reply


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


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """The conversation with a system turn first, unless it has one already (or there is no system text)."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


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
    return SFTExample(messages=with_system(messages, optional_str(record, "system")), prompt_field="conversations")


@register_format(
    "alpaca", "sft", lambda r: "instruction" in r and "output" in r, "instruction, input, output; optional system and history"
)
def parse_alpaca(record: dict) -> SFTExample:
    instruction = require_str(record, "instruction")
    extra_input = record.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise RecordError("input", f"must be a string, got {type(extra_input).__name__}")
    output = require_str(record, "output")
    system = optional_str(record, "system")
    messages = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise RecordError(f"history[{i}]", "must be a pair of two non-empty strings [instruction, response]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return SFTExample(messages=with_system(messages, system), prompt_field="instruction")


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
                 "prompt (string or messages ending with a user turn), optional system, optional reference (a reference "
                 "answer for eval's BLEU/ROUGE-L): prompts only (PPO, eval)")
def parse_prompt(record: dict) -> PromptExample:
    if isinstance(record.get("prompt"), list):
        messages = parse_turns(record["prompt"], "prompt", "role", "content", CHAT_ROLES, final_role="user")
    else:
        messages = [{"role": "user", "content": require_str(record, "prompt")}]
    return PromptExample(with_system(messages, optional_str(record, "system")), reference=optional_str(record, "reference"))


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
    return PromptExample(example.messages[:last_reply], example.prompt_field, example.origin, reference=example.messages[last_reply]["content"])


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


def read_tie(record: dict) -> bool:
    tie = record.get("tie", False)
    if tie is None:
        return False
    if not isinstance(tie, bool):
        raise RecordError("tie", f"must be true or false, got {type(tie).__name__}")
    return tie


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
    prompt = with_system(prompt, optional_str(record, "system"))
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
    prompt = with_system(prompt, optional_str(record, "system"))
    chosen, rejected = response_text(record["chosen"], "chosen"), response_text(record["rejected"], "rejected")
    check_pair(chosen, rejected)
    return PreferenceExample(prompt, chosen, rejected, read_margin(record), tie=read_tie(record))


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

