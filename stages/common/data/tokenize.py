"""Tokenizing parsed examples: the chat template (or our documented default), labels on response tokens only,
reward-model inputs, prompts, what happens to an example longer than its budget, and packing."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import DataError, RecordError
from .formats import PreferenceExample, PromptExample, SFTExample

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


OVERLONG_MODES = ("truncate", "drop", "error")


class Dropped(Exception):
    """An example over the length budget, with ``overlong: drop``."""


@dataclass
class Budget:
    """How many tokens an example may take, and what to do with one that takes more (``overlong``): truncate it (cut
    the prompt from the left, keeping the system prompt, and the response from the right, the response keeping at
    least ``response_share`` of the budget), drop it, or stop with an error naming it."""

    max_length: int
    overlong: str = "truncate"
    response_share: float = 0.5


def over_budget(budget: Budget, field: str, length: int, what: str = "the example") -> None:
    """Called for an example over the budget: raise unless it is to be truncated."""
    if budget.overlong == "drop":
        raise Dropped()
    if budget.overlong == "error":
        raise RecordError(field, f"{what} takes {length} tokens, max_length is {budget.max_length} (overlong: error; set overlong: "
                                 "truncate or drop to keep going, or raise max_length)")


def fit(head: list, prompt: list, responses: list[list], budget: Budget) -> tuple[list, list, list[list]]:
    """Cut (head, prompt, responses) to the budget: the responses from the right, to at least response_share of it
    (more when the prompt leaves room), then the prompt from the left; the head (system prompt) is kept while it fits."""
    longest = max((len(r) for r in responses), default=0)
    keep_response = min(longest, max(budget.max_length - len(head) - len(prompt), math.ceil(budget.response_share * budget.max_length)))
    keep_prompt = budget.max_length - keep_response - len(head)
    if keep_prompt < 0:  # a system prompt longer than the rest of the budget is cut too
        head, keep_prompt = head[: len(head) + keep_prompt], 0
    return head, prompt[len(prompt) - keep_prompt:], [r[:keep_response] for r in responses]


def head_chars(tokenizer, messages: list[dict], full: str) -> int:
    """Characters of the rendering that truncation keeps: the system prompt (and what the template puts before it)."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    try:
        rendered = render_chat(tokenizer, head)
    except Exception:  # noqa: BLE001 - a template that cannot render this prefix keeps no head
        return 0
    return len(rendered) if full.startswith(rendered) else 0


def split_tokens(offsets: list, *chars: int) -> list[int]:
    """The token positions where the text's character positions ``chars`` fall (the first token starting at or after each)."""
    return [next((p for p, (start, _) in enumerate(offsets) if start >= c), len(offsets)) for c in chars]


def tokenize_sft_example(example: SFTExample, tokenizer, budget: Budget) -> tuple[dict[str, list[int]], bool]:
    """(input_ids and labels, whether it was truncated); labels are IGNORE_INDEX everywhere but on response tokens."""
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        if len(ids) > budget.max_length:
            over_budget(budget, example.prompt_field, len(ids), "the text")
        return {"input_ids": ids[: budget.max_length], "labels": list(ids[: budget.max_length])}, len(ids) > budget.max_length
    text, spans = assistant_char_spans(tokenizer, example.messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, _end) in enumerate(offsets):
        if any(span_start <= start < span_end for span_start, span_end in spans):
            labels[position] = ids[position]
    if len(ids) <= budget.max_length:
        return {"input_ids": ids, "labels": labels}, False
    over_budget(budget, example.prompt_field, len(ids))
    head, response = split_tokens(offsets, head_chars(tokenizer, example.messages, text), spans[-1][0])
    rows = list(zip(ids, labels))
    head_rows, prompt_rows, [response_rows] = fit(rows[:head], rows[head:response], [rows[response:]], budget)
    kept = head_rows + prompt_rows + response_rows
    return {"input_ids": [i for i, _ in kept], "labels": [label for _, label in kept]}, True


def render_exchange(tokenizer, prompt: list[dict], response: str) -> str:
    """The text a reward model scores: the prompt and the response through the chat template."""
    return render_chat(tokenizer, prompt + [{"role": "assistant", "content": response}])


def tokenize_for_reward(tokenizer, prompt: list[dict], response: str, max_length: int) -> list[int]:
    """Right-truncated to max_length: the reward is read at the last kept token (scoring; training pairs are fit with
    the overlong policy instead)."""
    return tokenizer(render_exchange(tokenizer, prompt, response), add_special_tokens=False)["input_ids"][:max_length]


def tokenize_preference_example(example: PreferenceExample, tokenizer, budget: Budget) -> tuple[dict, bool]:
    """Both sides as the RM scores them; an overlong pair keeps the same prompt tokens on both sides."""
    prompt_text = render_chat(tokenizer, example.prompt, add_generation_prompt=True)
    texts = [render_exchange(tokenizer, example.prompt, response) for response in (example.chosen, example.rejected)]
    encoded = [tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text in texts]
    chosen_ids, rejected_ids = (e["input_ids"] for e in encoded)
    # where each response starts (DPO scores the response tokens only; the RM reads the whole sequence)
    starts = [split_tokens(e["offset_mapping"], len(prompt_text))[0] for e in encoded]
    length = max(len(chosen_ids), len(rejected_ids))
    truncated = length > budget.max_length
    if truncated:
        over_budget(budget, example.prompt_field, length, "the pair")
        sides = []
        for text, side in zip(texts, encoded):
            head, boundary = split_tokens(side["offset_mapping"], head_chars(tokenizer, example.prompt, text), len(prompt_text))
            sides.append((side["input_ids"][:head], side["input_ids"][head:boundary], side["input_ids"][boundary:]))
        (head_ids, prompt_ids, chosen), (_, _, rejected) = sides
        head_ids, prompt_ids, (chosen, rejected) = fit(head_ids, prompt_ids, [chosen, rejected], budget)
        chosen_ids, rejected_ids = head_ids + prompt_ids + chosen, head_ids + prompt_ids + rejected
        starts = [len(head_ids) + len(prompt_ids)] * 2
    if chosen_ids == rejected_ids:
        raise RecordError(example.prompt_field, f"chosen and rejected are identical within max_length={budget.max_length} tokens")
    return {"chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "chosen_start": starts[0], "rejected_start": starts[1],
            "margin": example.margin, "tie": example.tie}, truncated


def tokenize_prompt_example(example: PromptExample, tokenizer, budget: Budget) -> tuple[dict, bool]:
    """The prompt through the chat template with the generation prompt; a longer prompt keeps its system prompt and
    its last tokens (the question and the cue to answer matter more than the start of a long history)."""
    text = render_chat(tokenizer, example.prompt, add_generation_prompt=True)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if len(ids) <= budget.max_length:
        return {"prompt_ids": ids, "prompt": example.prompt, "reference": example.reference}, False
    over_budget(budget, example.prompt_field, len(ids), "the prompt")
    [head] = split_tokens(encoded["offset_mapping"], head_chars(tokenizer, example.prompt, text))
    head_ids, prompt_ids, _ = fit(ids[:head], ids[head:], [], budget)
    return {"prompt_ids": head_ids + prompt_ids, "prompt": example.prompt, "reference": example.reference}, True


TOKENIZERS = {"sft": tokenize_sft_example, "preference": tokenize_preference_example, "prompt": tokenize_prompt_example}


@dataclass
class TokenizeReport:
    """What tokenizing did to a set of examples: printed, and saved as the stage's data_stats.json."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped_invalid: int = 0


def tokenize_examples(examples: list, tokenizer, budget: Budget, skip_invalid: bool, kind: str = "sft") -> tuple[list[dict], TokenizeReport]:
    tokenize = TOKENIZERS[kind]
    rows, report = [], TokenizeReport(examples=len(examples))
    for example in examples:
        try:
            row, truncated = tokenize(example, tokenizer, budget)
        except Dropped:
            report.dropped += 1
            continue
        except RecordError as err:
            if skip_invalid:
                report.skipped_invalid += 1
                continue
            raise DataError(example.origin[0], err.message, record=example.origin[1], field=err.field) from None
        rows.append(row)
        report.truncated += truncated
    if report.skipped_invalid:
        print(f"[tristage] skipped {report.skipped_invalid} record(s) that do not fit max_length={budget.max_length} (skip_invalid)")
    if report.truncated or report.dropped:
        done = f"{report.truncated} truncated" if budget.overlong == "truncate" else f"{report.dropped} dropped"
        print(f"[tristage] {report.truncated + report.dropped} of {len(examples)} example(s) longer than max_length={budget.max_length}: "
              f"{done} (overlong: {budget.overlong})")
    return rows, report


def pack_rows(rows: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing (TRL's pack_dataset); each row keeps its examples' lengths."""
    import datasets
    from trl.data_utils import pack_dataset

    packed = pack_dataset(datasets.Dataset.from_list(rows), seq_length=max_length, strategy="bfd")
    return [{"input_ids": r["input_ids"], "labels": r["labels"], "seq_lengths": r["seq_lengths"]} for r in packed.to_list()]

