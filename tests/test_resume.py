"""Resume from a checkpoint continues at the right step and ends where an uninterrupted run ends."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_ok, read_metrics, run_stage


@pytest.mark.parametrize("mode", ["lora"])  # full fine-tuning: tests/test_kills.py kills and resumes it four times
@pytest.mark.slow  # resume is also what test_kills checks, ten times
def test_resume_matches_uninterrupted_run(tmp_path, tiny_model, mode):
    common = [f"model_name_or_path={tiny_model}", f"finetuning_type={mode}", "max_steps=8", "lora_dropout=0.1",
              "lr_scheduler_type=cosine", "warmup_steps=2"]
    straight = tmp_path / "straight"
    assert_ok(run_stage("sft", *common, f"output_dir={straight}", "save_strategy=steps", "save_steps=4"))
    assert (straight / "checkpoint-4" / "trainer_state.json").is_file()
    assert not list(straight.glob("*.tmp"))

    resumed = tmp_path / "resumed"
    result = run_stage("sft", *common, f"output_dir={resumed}", f"resume_from_checkpoint={straight / 'checkpoint-4'}")
    assert_ok(result)
    assert "resumed from" in result.stderr + result.stdout and "at step 4" in result.stderr + result.stdout
    resumed_metrics = read_metrics(resumed)
    assert [m["step"] for m in resumed_metrics] == [5, 6, 7, 8]
    straight_metrics = {m["step"]: m for m in read_metrics(straight)}
    for m in resumed_metrics:
        assert m["loss"] == pytest.approx(straight_metrics[m["step"]]["loss"], rel=1e-6)
        assert m["learning_rate"] == pytest.approx(straight_metrics[m["step"]]["learning_rate"], rel=1e-9)
    weights = "model.safetensors" if mode == "full" else "adapter_model.safetensors"
    a, b = load_file(straight / weights), load_file(resumed / weights)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
