"""Tokenizing parsed examples: the chat template (or our documented default), labels on response tokens only,
reward-model inputs, left-truncated prompts, and packing."""
from __future__ import annotations

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

