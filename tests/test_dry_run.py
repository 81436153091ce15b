"""--dry-run: config, data, tokenizer and the model skeleton (meta device, no weights) are checked, then exit."""
from __future__ import annotations

import json
import re

import pytest

from conftest import FIXTURES, assert_ok, run_in_process, run_stage


def dry_run_report(result) -> dict:
    assert_ok(result)
    match = re.search(r"^\{\n.*?^\}", result.stdout, flags=re.S | re.M)
    assert match, result.stdout[-2000:]
    return json.loads(match.group(0))


@pytest.mark.parametrize("mode", ["full", "lora", "qlora", "freeze", "ptuning"])
def test_sft_dry_run_reports_the_backbone_without_training(tmp_path, tiny_model, mode):
    out = tmp_path / "sft"
    report = dry_run_report(run_in_process("sft", "dry_run=true", f"model_name_or_path={tiny_model}", f"output_dir={out}",
                                           f"finetuning_type={mode}"))
    assert report["dry_run"] == "ok" and report["train_rows"] == 8 and report["optimizer_steps"] == 12
    assert (report["trainable_parameters"] == report["total_parameters"]) == (mode == "full")
    assert 0 < report["trainable_parameters"] <= report["total_parameters"]
    assert not list(out.glob("*.safetensors")) and not (out / "trainer_state.json").exists()


def test_rm_and_ppo_dry_runs(tmp_path, tiny_model):
    pairs = FIXTURES / "dpo_en_demo_sample.json"
    rm = dry_run_report(run_stage("rm", "--dry-run", f"model_name_or_path={tiny_model}", f"dataset={pairs}", "max_length=512",
                                  f"output_dir={tmp_path / 'rm'}", "finetuning_type=lora", config=FIXTURES / "rm_tiny.yaml"))
    assert rm["train_pairs"] == 5 and rm["trainable_parameters"] < rm["total_parameters"]
    ppo = dry_run_report(run_stage("ppo", "--dry-run", f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'ppo'}",
                                   config=FIXTURES / "ppo_tiny.yaml"))
    assert ppo["prompts"] == 8 and ppo["iterations"] == 4 and ppo["reward"] == ["rule:keyword:e"]


def test_a_dry_run_still_catches_bad_data(tmp_path, tiny_model):
    result = run_stage("sft", "--dry-run", f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'bad'}",
                       f"dataset={FIXTURES.parent / 'bad_inputs' / 'missing_output.jsonl'}")
    assert result.returncode == 2
