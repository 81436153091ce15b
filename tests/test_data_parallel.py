"""Several processes give the results of one: data parallelism without DeepSpeed (every rank holds the model, the
gradients are averaged — the multi-GPU path of QLoRA and of the shared backbone) and PPO's whitening over every
rank's rollout (with and without DeepSpeed). Two CPU processes (gloo) against one, on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, ROOT, assert_ok, free_port, read_metrics, run_stage

pytestmark = pytest.mark.slow  # several processes per run


def test_sft_without_deepspeed_on_two_processes_matches_one(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single, parallel = tmp_path / "single", tmp_path / "parallel"
    common = [f"model_name_or_path={tiny_model}", "finetuning_type=lora", "learning_rate=2e-2", "save_strategy=steps", "save_steps=6"]
    assert_ok(run_stage("sft", *common, f"output_dir={single}"))
    result = run_stage("sft", *common, f"output_dir={parallel}", "per_device_train_batch_size=2",
                       env={"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert_ok(result)
    assert "torchrun --nproc_per_node 2" in result.stdout and "2 process(es), no DeepSpeed" in result.stdout + result.stderr
    assert [m["loss"] for m in read_metrics(parallel)] == pytest.approx([m["loss"] for m in read_metrics(single)], rel=1e-4)
    assert (parallel / "checkpoint-6" / "engine.pt").is_file()  # written once (rank 0), read by both on resume
    # the same training up to float summation order (which Adam's normalized steps amplify on near-zero gradients)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), single).merge_and_unload()
    b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), parallel).merge_and_unload()
    trained = sum(float((x - w).abs().sum()) for x, w in zip(a.parameters(), base.parameters()))
    apart = sum(float((x - y).abs().sum()) for x, y in zip(a.parameters(), b.parameters()))
    assert trained > 1.0 and apart < 0.01 * trained


def fixed_rollouts(tmp_path, processes: int, *overrides: str) -> list[dict]:
    out = tmp_path / f"history{processes}.json"
    config = FIXTURES / ("grpo_tiny.yaml" if "advantage_estimator=grpo" in overrides else "ppo_tiny.yaml")
    command = ["torchrun", "--nproc_per_node", str(processes), "--master_port", str(free_port()),
               str(ROOT / "tests" / "ppo_fixed_rollouts.py"), str(out), "--config", str(config),
               f"output_dir={tmp_path / f'out{processes}'}", "max_steps=3", "rollout_batch_size=16", "gradient_accumulation_steps=2",
               "ppo_epochs=2", f"per_device_train_batch_size={8 // processes}", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", [["finetuning_type=lora", "shared_backbone=true"],
                                  ["finetuning_type=full", f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"],
                                  ["finetuning_type=full", f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
                                   "advantage_estimator=grpo", "samples_per_prompt=2", "rollout_batch_size=8",
                                   "loss_aggregation=seq_mean_token_sum"]],
                         ids=["shared-backbone-data-parallel", "separate-zero2", "grpo-zero2"])
def test_ppo_on_two_processes_reproduces_one_process_on_the_same_rollouts(tmp_path, tiny_model, mode):
    """Rewards and advantages are whitened over every rank's rows (per-rank whitening made results depend on the
    number of processes), and the shared backbone trains data-parallel without DeepSpeed."""
    one = fixed_rollouts(tmp_path, 1, f"model_name_or_path={tiny_model}", *mode)
    two = fixed_rollouts(tmp_path, 2, f"model_name_or_path={tiny_model}", *mode)
    keys = {"kl", "policy_loss", "value_loss", "kl_loss", "approx_kl", "advantage_square_sum"} & set(one[0])
    assert ("value_loss" in keys) == ("advantage_estimator=grpo" not in mode) and ("kl_loss" in keys) == ("advantage_estimator=grpo" in mode)
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, one, two)
    assert one[-1]["kl"] != 0.0  # the policy moved


def test_the_shared_backbone_runs_data_parallel_through_the_launcher(tmp_path, tiny_model):
    from stages.common.loading import load_policy

    out = tmp_path / "shared"
    result = run_stage("ppo", f"model_name_or_path={tiny_model}", f"output_dir={out}", "finetuning_type=lora", "shared_backbone=true",
                       "max_steps=2", "save_strategy=steps", "save_steps=1", "per_device_train_batch_size=4",
                       config=FIXTURES / "ppo_tiny.yaml", env={"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert_ok(result)
    assert "1 model(s) in memory" in result.stdout + result.stderr and "2 process(es)" in result.stdout + result.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    policy = load_policy(str(out))
    assert all(torch.isfinite(p).all() for p in policy.parameters())
