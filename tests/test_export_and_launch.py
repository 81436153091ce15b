"""export merges an adapter into a model plain transformers loads; the launcher's demo default runs."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from conftest import assert_ok, read_metrics, run_in_process, run_stage


def test_export_merges_lora_into_a_standalone_model(tmp_path, tiny_model):
    from peft import PeftModel

    adapter = tmp_path / "adapter"
    assert_ok(run_stage("sft", f"model_name_or_path={tiny_model}", f"output_dir={adapter}", "finetuning_type=lora",
                        "learning_rate=2e-2", "max_steps=4"))
    merged_dir = tmp_path / "merged"
    assert_ok(run_stage("export", "--adapter", str(adapter), "--out", str(merged_dir), config=None))
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-5)


def test_export_refuses_ptuning(tmp_path, tiny_model):
    adapter = tmp_path / "prefix"
    assert_ok(run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={adapter}", "finetuning_type=ptuning", "max_steps=2"))
    result = run_in_process("export", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), config=None)
    assert result.returncode == 2 and "cannot be merged" in result.stderr


def test_demo_default_builds_its_model_and_data_and_trains(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "sft"
    result = run_stage("sft", f"output_dir={out}", "max_steps=3", "logging_steps=1", f"model_name_or_path={demo / 'base'}",
                       f"dataset={demo / 'data' / 'sft_train.jsonl'}", f"eval_dataset={demo / 'data' / 'sft_eval.jsonl'}",
                       config=None, env={"DEMO_DIR": str(demo)})
    assert_ok(result)
    assert (demo / "READY").exists() and (demo / "base" / "config.json").exists()
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics][:3] == [1, 2, 3] and "eval_loss" in metrics[-1]
    assert (out / "tristage_config.yaml").exists() and (out / "trainer_state.json").exists()
    assert list((out / "tensorboard").glob("events.*"))
    assert AutoModelForCausalLM.from_pretrained(out) is not None
