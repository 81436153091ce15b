"""Bad data and bad configs fail before training: one line naming file, record and field (or key), exit 2."""
from __future__ import annotations

import pytest

from conftest import ROOT, run_stage
from stages.cli import main as tristage

BAD = ROOT / "tests" / "bad_inputs"

CASES = [  # file, what the message must name
    ("broken_json.json", ["broken_json.json", "broken JSON", "line 4"]),
    ("broken_jsonl_line.jsonl", ["broken_jsonl_line.jsonl", "record 2", "line 2"]),
    ("missing_output.jsonl", ["missing_output.jsonl", "record 2", "field 'output'", "missing"]),
    ("empty_response.jsonl", ["empty_response.jsonl", "record 3", "field 'output'", "empty"]),
    ("unknown_format.jsonl", ["unknown_format.jsonl", "record 1", "unknown format", "question"]),
    ("wrong_type.jsonl", ["wrong_type.jsonl", "record 1", "field 'instruction'", "must be a string"]),
    ("not_utf8.jsonl", ["not_utf8.jsonl", "not UTF-8", "line 1"]),
    ("empty.jsonl", ["empty.jsonl", "empty"]),
    ("sharegpt_unknown_role.jsonl", ["record 1", "field 'conversations[1].from'", "robot"]),
    ("messages_not_alternating.jsonl", ["record 2", "field 'messages[1].content'", "expected an assistant turn"]),
    ("does_not_exist.jsonl", ["does_not_exist.jsonl", "no such file"]),
]


@pytest.mark.parametrize("name, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_one_clear_line_before_training(tmp_path, tiny_model, capsys, name, expected):
    out = tmp_path / "out"
    code = tristage(["sft", f"model_name_or_path={tiny_model}", f"dataset={BAD / name}", f"output_dir={out}", "report_to=none"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("tristage: error:"), err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (out / "metrics.jsonl").exists() and not (out / "model.safetensors").exists()


def test_skip_invalid_drops_and_counts(tmp_path, tiny_model, capsys):
    from stages.common.config import DataArguments
    from stages.common.data import build_sft_data
    from transformers import AutoTokenizer

    data = build_sft_data(DataArguments(dataset=[str(BAD / "empty_response.jsonl")], skip_invalid=True),
                          AutoTokenizer.from_pretrained(tiny_model), seed=0)
    assert len(data.train) == 2
    assert "skipped 1 invalid record(s) of 3" in capsys.readouterr().out


@pytest.mark.parametrize("override, key", [("lora_rnak=8", "lora_rnak"), ("finetuning_type=adapterz", "finetuning_type"),
                                           ("max_steps=many", "max_steps")])
def test_bad_config_names_the_key(tmp_path, tiny_model, capsys, override, key):
    code = tristage(["sft", f"model_name_or_path={tiny_model}", f"dataset={ROOT / 'tests/fixtures/text_sample.jsonl'}",
                     f"output_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err


def test_launcher_passes_the_exit_code_through(tmp_path, tiny_model):
    result = run_stage("sft", f"model_name_or_path={tiny_model}", f"dataset={BAD / 'missing_output.jsonl'}", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert "record 2: field 'output': missing" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert list((tmp_path / "logs").glob("sft-*.log"))  # the log is tee'd into the output directory
