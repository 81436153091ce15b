"""Preference formats in the one registry: real ShareGPT-ranking samples, HH-RLHF transcripts, explicit
and implicit prompts, and bad pairs named by file, record and field before training."""
from __future__ import annotations

import json

import pytest

from conftest import FIXTURES, ROOT
from stages.cli import main as tristage
from stages.common.data import FORMATS, detect_format, parse_records, read_records
from stages.common.errors import DataError


@pytest.mark.parametrize("name, fmt", [("dpo_en_demo_sample.json", "sharegpt_ranking"), ("dpo_zh_demo_sample.json", "sharegpt_ranking"),
                                       ("hh_rlhf_sample.jsonl", "hh_rlhf")])
def test_samples_parse_as_they_are(name, fmt):
    records = read_records(str(FIXTURES / name))
    assert detect_format(records[0], "preference").name == fmt
    examples = parse_records(name, records, "preference")
    assert len(examples) == len(records)
    assert all(e.prompt[-1]["role"] == "user" and e.chosen and e.rejected for e in examples)


def test_shared_dpo_files_parse_whole():
    for name in ("llamafactory_dpo_en_demo.json", "llamafactory_dpo_zh_demo.json"):
        path = ROOT.parent / "shared" / "data" / name
        if path.exists():  # beside every checkout in CI; the fixtures above hold records copied from them
            assert len(parse_records(name, read_records(str(path)), "preference")) == 300


def test_sharegpt_ranking_keeps_system_and_turns():
    record = json.loads((FIXTURES / "dpo_en_demo_sample.json").read_text())[3]
    example = FORMATS["sharegpt_ranking"].parse(record)
    assert [m["role"] for m in example.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert example.chosen == record["chosen"]["value"] and example.rejected == record["rejected"]["value"]


def test_hh_transcript_with_several_turns_splits_into_prompt_chosen_rejected():
    record = read_records(str(FIXTURES / "hh_rlhf_sample.jsonl"))[0]
    example = FORMATS["hh_rlhf"].parse(record)
    assert example.prompt == [{"role": "user", "content": "What is a good name for a cat?"},
                              {"role": "assistant", "content": "Many people like Luna or Milo."},
                              {"role": "user", "content": "Something more unusual?"}]
    assert example.chosen == "How about Pistachio or Sir Whiskerton?" and example.rejected == "Cat."


def test_explicit_prompt_strings_messages_and_margin():
    plain = FORMATS["prompt_chosen_rejected"].parse({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 2})
    assert plain.prompt == [{"role": "user", "content": "Hi"}] and plain.margin == 2.0
    chat = FORMATS["prompt_chosen_rejected"].parse({
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]})
    assert chat.prompt[0]["role"] == "system" and chat.chosen == "Hello!"
    implicit = detect_format({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                              "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]}, "preference")
    assert implicit.name == "chosen_rejected_messages"


BAD_PAIRS = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "field 'rejected': identical to chosen"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen': empty response"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "field 'rejected': empty response"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin': must be a number"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt"}},
     "field 'rejected.value': missing"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "field 'chosen'"),
]


@pytest.mark.parametrize("bad, expected", BAD_PAIRS)
def test_bad_pairs_fail_before_training(tmp_path, tiny_model, capsys, bad, expected):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ([good, bad] if "prompt" in bad else [bad])) + "\n")
    record = 2 if "prompt" in bad else 1
    code = tristage(["rm", f"model_name_or_path={tiny_model}", f"dataset={path}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"pairs.jsonl: record {record}: {expected}" in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_skip_invalid_drops_bad_pairs(tmp_path):
    from stages.common.config import DataArguments
    from stages.common.data import load_source_examples

    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "x", "rejected": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError):
        load_source_examples([str(path)], "preference", DataArguments(dataset=[str(path)]))
    [examples] = load_source_examples([str(path)], "preference", DataArguments(dataset=[str(path)], skip_invalid=True))
    assert len(examples) == 1
