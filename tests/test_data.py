"""The data-format registry: detection, parsing of real-format samples, prompt masking, mixing, packing."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import FIXTURES
from stages.common.config import DataArguments
from stages.common.data import (DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, FORMATS, Budget, build_sft_data, collate_sft, mix_sources,
                                parse_records, read_records, tokenize_sft_example)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("name, fmt, count", [
    ("alpaca_en_demo_sample.json", "alpaca", 8), ("alpaca_zh_demo_sample.json", "alpaca", 8),
    ("sharegpt_sample.json", "sharegpt", 2), ("messages_sample.jsonl", "messages", 2),
    ("prompt_completion_sample.jsonl", "prompt_completion", 2), ("text_sample.jsonl", "text", 2)])
def test_formats_are_detected_and_parsed(name, fmt, count):
    records = read_records(str(FIXTURES / name))
    assert FORMATS[fmt].detect(records[0])
    examples = parse_records(name, records, "sft")
    assert len(examples) == count
    assert examples[0].origin == (name, 1)


def test_shared_alpaca_files_read_as_they_are():
    """The real LLaMA-Factory samples in ../shared/data (when present) parse whole, English and Chinese."""
    from conftest import ROOT

    for name in ("llamafactory_alpaca_en_demo.json", "llamafactory_alpaca_zh_demo.json"):
        path = ROOT.parent / "shared" / "data" / name
        if not path.exists():  # the fixtures above hold records copied from them
            continue
        examples = parse_records(str(path), read_records(str(path)), "sft")
        assert len(examples) == len(json.loads(path.read_text(encoding="utf-8")))


def test_alpaca_fields_become_a_conversation():
    record = {"system": "S", "history": [["q1", "a1"]], "instruction": "Do it", "input": "with this", "output": "done"}
    example = FORMATS["alpaca"].parse(record)
    assert example.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "Do it\nwith this"},
                                {"role": "assistant", "content": "done"}]


def test_multi_turn_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Blue, then green."}]
    example = FORMATS["messages"].parse({"messages": messages})
    row, _ = tokenize_sft_example(example, tokenizer, Budget(512))
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    # Token by token: every label is either masked or equal to its token; the labeled runs, decoded, are
    # exactly the two responses with their end-of-turn, and no user or system text is labeled.
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    decoded = [tokenizer.decode(run) for run in runs]
    assert decoded == ["Red.</s>\n\n", "Blue, then green.</s>\n\n"]
    masked_text = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
    assert "Name a color." in masked_text and "Another?" in masked_text and "Be brief." in masked_text
    assert "Red" not in masked_text and "Blue" not in masked_text


def test_a_tokenizer_without_template_gets_the_documented_one(tmp_path, tiny_model):
    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments

    plain = AutoTokenizer.from_pretrained(tiny_model)
    plain.chat_template = None
    plain.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    assert load_tokenizer(ModelArguments(model_name_or_path=str(tmp_path))).chat_template == DEFAULT_CHAT_TEMPLATE


def test_text_format_trains_every_token(tokenizer):
    row, _ = tokenize_sft_example(FORMATS["text"].parse({"text": "plain words"}), tokenizer, Budget(64))
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id


def test_prompt_longer_than_max_length_is_named(tokenizer):
    example = FORMATS["alpaca"].parse({"instruction": "word " * 200, "output": "ok"})
    example.origin = ("f.json", 3)
    with pytest.raises(Exception) as err:
        tokenize_sft_example(example, tokenizer, Budget(32, overlong="error"))
    assert "instruction" in str(getattr(err.value, "field", "")) and "max_length" in str(err.value)


def test_mixing_by_ratio_and_eval_split(tmp_path, tokenizer):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"a{i}", "completion": "x"}) + "\n" for i in range(30)))
    b.write_text("".join(json.dumps({"prompt": f"b{i}", "completion": "y"}) + "\n" for i in range(10)))
    mixed = mix_sources([parse_records("a", read_records(str(a)), "sft"), parse_records("b", read_records(str(b)), "sft")],
                        [0.5, 0.5], seed=0)
    from_a = sum(e.messages[0]["content"].startswith("a") for e in mixed)
    assert len(mixed) == 40 and from_a == 20  # b is upsampled to half of the mixture
    data = build_sft_data(DataArguments(dataset=[str(a), str(b)], val_size=0.25), tokenizer, seed=0)
    assert (len(data.train), len(data.eval)) == (30, 10)


def test_packing_keeps_examples_apart(tmp_path, tokenizer):
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "answer " * (i + 1)}) + "\n" for i in range(12)))
    unpacked = build_sft_data(DataArguments(dataset=[str(path)], max_length=128), tokenizer, seed=0)
    packed = build_sft_data(DataArguments(dataset=[str(path)], max_length=128, packing=True), tokenizer, seed=0)
    assert len(packed.train) < len(unpacked.train)
    assert sum(len(r["input_ids"]) for r in packed.train) == sum(len(r["input_ids"]) for r in unpacked.train)
    batch = collate_sft(packed.train[:2], tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # transformers builds the block-diagonal mask from position ids
    row = packed.train[0]
    positions = batch["position_ids"][0, : len(row["input_ids"])].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) == len(row["seq_lengths"]) and sum(row["seq_lengths"]) == len(row["input_ids"])


def test_packed_forward_equals_separate_forwards(tmp_path, tiny_model, tokenizer):
    """Packing must not let examples attend to each other: per-token logits equal the unpacked ones."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    first, second = tokenizer("The Zephyr lamp")["input_ids"], tokenizer("costs 25 dollars")["input_ids"]
    packed = torch.tensor([first + second])
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]  # as in training
        alone = torch.cat([model(input_ids=torch.tensor([first])).logits[0], model(input_ids=torch.tensor([second])).logits[0]])
    assert torch.allclose(together, alone, atol=1e-5)


def test_parquet_csv_and_dataset_directories(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    folder = tmp_path / "dataset_dir"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_json(str(folder / "train.jsonl"))
    for source in (tmp_path / "d.parquet", tmp_path / "d.csv", folder):  # a directory goes through datasets.load_dataset
        examples = parse_records(str(source), read_records(str(source)), "sft")
        assert [e.messages[-1]["content"] for e in examples] == [f"a{i}" for i in range(5)]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"], ids=["U+2028", "U+2029", "U+0085"])
def test_line_separators_inside_json_strings_are_text_not_line_breaks(tmp_path, char):
    """JSON allows U+2028, U+2029 and U+0085 unescaped inside strings (eval's export_pairs and collect's export write
    them raw); a JSONL reader must break lines at \\n only."""
    c = char
    records = {
        "sft": [{"instruction": f"a{c}b", "input": f"c{c}d", "output": f"e{c}f", "system": f"s{c}t", "history": [[f"h{c}1", f"h{c}2"]]},
                {"messages": [{"role": "system", "content": f"s{c}"}, {"role": "user", "content": f"u{c}"},
                              {"role": "assistant", "content": f"a{c}"}]},
                {"conversations": [{"from": "human", "value": f"q{c}"}, {"from": "gpt", "value": f"r{c}"}], "system": f"s{c}"},
                {"prompt": f"p{c}", "completion": f"c{c}"}, {"text": f"t{c}x"}],
        "preference": [{"prompt": f"p{c}", "chosen": f"c{c}", "rejected": f"r{c}", "system": f"s{c}"},
                       {"conversations": [{"from": "human", "value": f"q{c}"}], "chosen": {"from": "gpt", "value": f"c{c}"},
                        "rejected": {"from": "gpt", "value": f"r{c}"}},
                       {"chosen": f"\n\nHuman: q{c}q\n\nAssistant: c{c}c", "rejected": f"\n\nHuman: q{c}q\n\nAssistant: r{c}r"},
                       {"chosen": [{"role": "user", "content": f"q{c}"}, {"role": "assistant", "content": f"c{c}"}],
                        "rejected": [{"role": "user", "content": f"q{c}"}, {"role": "assistant", "content": f"r{c}"}]}],
        "prompt": [{"prompt": f"p{c}", "system": f"s{c}"}, {"prompt": [{"role": "user", "content": f"m{c}"}]}],
    }
    for kind, rows in records.items():
        for number, record in enumerate(rows):
            path = tmp_path / f"{kind}{number}.jsonl"
            path.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(record, ensure_ascii=False) + "\r\n",
                            encoding="utf-8")
            read = read_records(str(path))
            assert read == [record, record], (kind, number)
            examples = parse_records(str(path), read, kind)
            import dataclasses

            fields = json.dumps(dataclasses.asdict(examples[0]), ensure_ascii=False)
            assert len(examples) == 2 and c in fields, (kind, number, fields)


# ------------------------------------------------------------------------------------------ overlong examples
LONG_SYSTEM, LONG_QUESTION, LONG_ANSWER = "Be brief.", " ".join(f"word{i}" for i in range(120)) + " What is it?", \
    " ".join(f"answer{i}" for i in range(120)) + " Done."


def test_an_overlong_conversation_keeps_its_system_prompt_its_last_question_tokens_and_part_of_the_answer(tokenizer):
    from stages.common.data.tokenize import tokenize_preference_example, tokenize_prompt_example

    record = {"system": LONG_SYSTEM, "instruction": LONG_QUESTION, "output": LONG_ANSWER}
    example = FORMATS["alpaca"].parse(record)
    full, truncated = tokenize_sft_example(example, tokenizer, Budget(4096))
    assert not truncated and len(full["input_ids"]) > 128
    row, truncated = tokenize_sft_example(example, tokenizer, Budget(128, response_share=0.25))
    ids, labels = row["input_ids"], row["labels"]
    assert truncated and len(ids) == 128 and len(labels) == 128
    text = tokenizer.decode(ids)
    assert text.startswith(tokenizer.bos_token + LONG_SYSTEM)  # the system prompt stays
    assert "What is it?" in text and "### Assistant:" in text  # the prompt was cut from the left: its end stays
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert len(trained) >= 32 and tokenizer.decode(trained).startswith("answer0")  # the response, cut from the right
    assert "word0 " not in text

    pair = FORMATS["prompt_chosen_rejected"].parse({"system": LONG_SYSTEM, "prompt": LONG_QUESTION, "chosen": LONG_ANSWER,
                                                    "rejected": "No."})
    row, truncated = tokenize_preference_example(pair, tokenizer, Budget(128))
    assert truncated and max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 128
    prefix = len(row["rejected_ids"]) - len(tokenizer("No.</s>\n\n", add_special_tokens=False)["input_ids"])
    assert row["chosen_ids"][:prefix] == row["rejected_ids"][:prefix]  # both sides keep the same prompt tokens

    prompt = FORMATS["prompt"].parse({"system": LONG_SYSTEM, "prompt": LONG_QUESTION})
    row, truncated = tokenize_prompt_example(prompt, tokenizer, Budget(48))
    text = tokenizer.decode(row["prompt_ids"])
    assert truncated and len(row["prompt_ids"]) == 48 and text.startswith(tokenizer.bos_token + LONG_SYSTEM)
    assert text.endswith("What is it?\n\n### Assistant:\n")


def test_overlong_truncate_drop_and_error_are_counted_and_saved(tmp_path, tiny_model, tokenizer):
    from conftest import TINY_SFT, run_in_process

    path = tmp_path / "mixed.jsonl"
    rows = [{"instruction": LONG_QUESTION, "output": LONG_ANSWER}] * 2 + [{"instruction": "Hi?", "output": "Hello."}] * 6
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode, kept in (("truncate", 8), ("drop", 6)):
        data = build_sft_data(DataArguments(dataset=[str(path)], max_length=96, overlong=mode), tokenizer, seed=0)
        assert len(data.train) == kept and all(len(r["input_ids"]) <= 96 for r in data.train)
        assert (data.reports["train"].truncated, data.reports["train"].dropped) == ((2, 0) if mode == "truncate" else (0, 2))
    with pytest.raises(Exception, match=r"record 1: field 'instruction': the example takes \d+ tokens, max_length is 96 \(overlong: error"):
        build_sft_data(DataArguments(dataset=[str(path)], max_length=96, overlong="error"), tokenizer, seed=0)
    out = tmp_path / "run"
    result = run_in_process("sft", f"model_name_or_path={tiny_model}", f"dataset={path}", f"output_dir={out}", "max_steps=1")
    assert result.returncode == 0 and "2 of 8 example(s) longer than max_length=96: 2 truncated" in result.stdout
    assert json.loads((out / "data_stats.json").read_text())["train"] == {"examples": 8, "truncated": 2, "dropped": 0,
                                                                           "skipped_invalid": 0}


def test_the_real_chinese_alpaca_sample_trains_with_the_demo_settings(tmp_path, tiny_model):
    """LLaMA-Factory's alpaca_zh_demo records (copied into the fixtures) with LoRA and max_length 192: long records are
    truncated and counted, not a stop at record 3."""
    from conftest import run_in_process

    out = tmp_path / "zh"
    result = run_in_process("sft", f"model_name_or_path={tiny_model}", f"dataset={FIXTURES / 'alpaca_zh_demo_sample.json'}",
                            "finetuning_type=lora", "max_length=192", f"output_dir={out}", "max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert stats["examples"] == 8 and stats["truncated"] >= 1 and stats["dropped"] == 0
