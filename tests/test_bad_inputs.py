"""Bad data and bad configs fail before training: one line naming file, record and field (or key), exit 2."""
from __future__ import annotations

import pytest

from conftest import ROOT, run_stage
from stages.cli import main as tristage

BAD = ROOT / "tests" / "bad_inputs"

CASES = [  # stage, file, what the one-line message must name
    ("sft", "broken_json.json", ["broken_json.json", "broken JSON", "line 4"]),
    ("sft", "broken_jsonl_line.jsonl", ["broken_jsonl_line.jsonl", "record 2", "line 2"]),
    ("sft", "missing_output.jsonl", ["missing_output.jsonl", "record 2", "field 'output'", "missing"]),
    ("sft", "empty_response.jsonl", ["empty_response.jsonl", "record 3", "field 'output'", "empty"]),
    ("sft", "unknown_format.jsonl", ["unknown_format.jsonl", "record 1", "unknown format", "question"]),
    ("sft", "wrong_type.jsonl", ["wrong_type.jsonl", "record 1", "field 'instruction'", "must be a string"]),
    ("sft", "not_utf8.jsonl", ["not_utf8.jsonl", "not UTF-8", "line 1"]),
    ("sft", "empty.jsonl", ["empty.jsonl", "empty"]),
    ("sft", "only_blank_lines.jsonl", ["only_blank_lines.jsonl", "empty"]),
    ("sft", "top_level_not_list.json", ["top_level_not_list.json", "list of records"]),
    ("sft", "record_not_object.jsonl", ["record 1", "must be an object", "list"]),
    ("sft", "sharegpt_unknown_role.jsonl", ["record 1", "field 'conversations[1].from'", "robot"]),
    ("sft", "messages_not_alternating.jsonl", ["record 2", "field 'messages[1].content'", "expected an assistant turn"]),
    ("sft", "messages_empty_list.jsonl", ["record 1", "field 'messages'", "no user/assistant turns"]),
    ("sft", "messages_unknown_role.jsonl", ["record 1", "field 'messages[1].role'", "wizard"]),
    ("sft", "messages_content_not_string.jsonl", ["record 1", "field 'messages[0].content'", "must be a string"]),
    ("sft", "alpaca_history_wrong_type.jsonl", ["record 1", "field 'history'", "must be a list"]),
    ("sft", "prompt_completion_empty_completion.jsonl", ["record 1", "field 'completion'", "empty"]),
    ("sft", "text_not_string.jsonl", ["record 1", "field 'text'", "must be a string"]),
    ("sft", "sft_prompt_too_long.jsonl", ["record 2", "field 'instruction'", "max_length is 256", "overlong: error"]),
    ("sft", "does_not_exist.jsonl", ["does_not_exist.jsonl", "no such file"]),
    ("rm", "pref_chosen_equals_rejected.jsonl", ["record 2", "field 'rejected'", "identical to chosen"]),
    ("rm", "pref_missing_rejected.jsonl", ["record 2", "field 'rejected'", "missing"]),
    ("rm", "pref_empty_chosen.jsonl", ["record 3", "field 'chosen'", "empty"]),
    ("rm", "pref_wrong_type.jsonl", ["record 1", "field 'chosen'", "got int"]),
    ("rm", "pref_tie_not_bool.jsonl", ["record 2", "field 'tie'", "true or false"]),
    ("rm", "pref_null_prompt.jsonl", ["record 1", "field 'prompt'", "missing"]),
    ("rm", "pref_sharegpt_ranking_ends_with_gpt.jsonl", ["record 1", "field 'conversations'", "user turn"]),
    ("rm", "pref_hh_no_turns.jsonl", ["record 1", "unknown format"]),
    ("rm", "pref_messages_differ_early.jsonl", ["record 1", "field 'chosen'", "final assistant turn"]),
    ("rm", "pref_prompt_too_long.jsonl", ["record 2", "field 'prompt'", "max_length is 256", "overlong: error"]),
    ("ppo", "prompt_empty.jsonl", ["record 2", "field 'prompt'", "empty"]),
    ("ppo", "prompt_messages_ends_with_assistant.jsonl", ["record 1", "field 'prompt'", "user turn"]),
    ("ppo", "prompt_system_wrong_type.jsonl", ["record 1", "field 'system'", "must be a string"]),
    ("sft", "config_unknown_key.yaml", ["config_unknown_key.yaml", "unknown key", "learnig_rate_warmup"]),
    ("sft", "config_wrong_type.yaml", ["config_wrong_type.yaml", "per_device_train_batch_size", "four"]),
    ("sft", "config_broken_yaml.yaml", ["config_broken_yaml.yaml", "not valid YAML"]),
    ("sft", "config_not_a_mapping.yaml", ["config_not_a_mapping.yaml", "mapping"]),
    ("sft", "config_unknown_finetuning_type.yaml", ["key 'finetuning_type'", "adapterz"]),
    ("sft", "config_bad_base.yaml", ["key 'base'", "does_not_exist.yaml"]),
    ("rm", "config_missing_deepspeed_file.yaml", ["key 'deepspeed'", "zero4.json"]),
]
CASES += [("dpo", name, expected) for stage, name, expected in CASES if stage == "rm" and name.startswith("pref_")]  # DPO reads pairs too
STAGE_ARGS = {"sft": ["max_length=256"], "rm": ["max_length=256"], "ppo": ["--config", str(ROOT / "tests" / "fixtures" / "ppo_tiny.yaml")],
              "dpo": ["--config", str(ROOT / "tests" / "fixtures" / "dpo_tiny.yaml"), "max_length=256"]}
FILE_ARGS = {"sft_prompt_too_long.jsonl": ["overlong=error"], "pref_prompt_too_long.jsonl": ["overlong=error"]}  # else truncated
GOOD_DATA = {"sft": ROOT / "tests" / "fixtures" / "alpaca_en_demo_sample.json", "rm": ROOT / "tests" / "fixtures" / "dpo_en_demo_sample.json"}


def test_the_corpus_has_at_least_30_bad_files_and_every_one_is_checked():
    files = {p.name for p in BAD.iterdir()}
    assert len(files) >= 30
    assert files <= {name for _stage, name, _ in CASES}, files - {name for _stage, name, _ in CASES}


@pytest.mark.parametrize("stage, name, expected", CASES, ids=[c[1] if c[0] != "dpo" else f"dpo-{c[1]}" for c in CASES])
def test_bad_input_is_one_clear_line_before_training(tmp_path, tiny_model, capsys, stage, name, expected):
    out = tmp_path / "out"
    if name.endswith(".yaml"):  # a bad config with good data
        inputs = ["--config", str(BAD / name), f"dataset={GOOD_DATA[stage]}"]
    else:
        inputs = [*STAGE_ARGS[stage], *FILE_ARGS.get(name, []), f"dataset={BAD / name}"]
    code = tristage([stage, *inputs, f"model_name_or_path={tiny_model}", f"output_dir={out}", "report_to=none"])
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


@pytest.mark.parametrize("override, key", [
    ("lora_rnak=8", "lora_rnak"), ("finetuning_type=adapterz", "finetuning_type"), ("max_steps=many", "max_steps"),
    # the keys of round 2
    ("overlong=cut", "overlong"), ("overlong_response_share=1.5", "overlong_response_share"), ("optim=adam", "optim"),
    ("optim_args=momentun=0.9", "optim_args"), ("report_to=comet", "report_to"), ("save_strategy=epoch", "save_strategy"),
    ("eval_strategy=epoch", "eval_strategy"), ("logging_strategy=epoch", "logging_strategy"),
    ("average_tokens_across_devices=false", "average_tokens_across_devices"), ("dataloader_num_workers=4", "dataloader_num_workers"),
    ("metric_for_best_model=bleu", "metric_for_best_model"), ("save_only_model=maybe", "save_only_model")])
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


def test_a_missing_stage_output_names_the_stage_that_writes_it(tmp_path, capsys):
    """launch/run_stage.sh rm before sft used to say "Repo id must be in the form 'repo_name'..." (a hub error)."""
    missing = tmp_path / "runs" / "demo"
    cases = [(["rm", f"model_name_or_path={missing / 'sft'}", f"dataset={GOOD_DATA['rm']}"], "model_name_or_path", "sft"),
             (["ppo", "--config", str(ROOT / "tests" / "fixtures" / "ppo_tiny.yaml"), f"model_name_or_path={missing / 'sft'}"],
              "model_name_or_path", "sft"),
             (["ppo", "--config", str(ROOT / "tests" / "fixtures" / "ppo_tiny.yaml"), f"model_name_or_path={ROOT / 'tests'}",
               f"reward_model={missing / 'rm'}", "critic_init=actor"], "reward_model", "rm")]
    for argv, key, stage in cases:
        assert tristage([*argv, f"output_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"key '{key}'" in err and "does not exist" in err, err
        assert f"run launch/run_stage.sh {stage} first" in err and "Repo id" not in err, err
