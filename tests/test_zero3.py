"""ZeRO-3 SFT on 2 CPU processes (torchrun + gloo, through run_stage.sh): two "nodes" on loopback, and NPROC=2."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, assert_ok, read_metrics, run_stage, run_two_nodes

ZERO3 = str(ROOT / "configs" / "deepspeed" / "zero3.json")
pytestmark = pytest.mark.slow  # several processes per run


def test_zero3_on_two_nodes_matches_one_process_and_saves_what_ranks_held(tmp_path, tiny_model):
    # 2 nodes x 1 rank x micro-batch 2 x accumulation 2 see the same 8 examples per step as 1 process x micro-batch 4,
    # so with the loss normalized over all ranks' tokens the loss curves must agree.
    single = tmp_path / "single"
    assert_ok(run_stage("sft", f"model_name_or_path={tiny_model}", f"output_dir={single}", "finetuning_type=full"))
    sharded = tmp_path / "zero3"
    nodes = run_two_nodes("sft", f"model_name_or_path={tiny_model}", f"output_dir={sharded}", "finetuning_type=full",
                          f"deepspeed={ZERO3}", "per_device_train_batch_size=2", "save_weight_digest=true")
    for result in nodes:
        assert_ok(result)
        assert "--nnodes 2" in result.stdout
    assert "2 process(es), ZeRO-3" in nodes[0].stdout + nodes[0].stderr
    single_losses = [m["loss"] for m in read_metrics(single)]
    sharded_losses = [m["loss"] for m in read_metrics(sharded)]
    assert sharded_losses == pytest.approx(single_losses, rel=1e-4)
    assert sharded_losses[-1] < sharded_losses[0] - 0.5

    # The consolidated checkpoint loads in one process and holds exactly what both ranks held.
    model = AutoModelForCausalLM.from_pretrained(sharded)
    for rank in (0, 1):
        digest = json.loads((sharded / "weight_digest" / f"rank{rank}.json").read_text())
        for name, param in model.named_parameters():
            values = param.detach().double()
            assert digest[name] == pytest.approx([float(values.sum()), float(values.pow(2).sum())], rel=1e-6, abs=1e-6), name
    reference = AutoModelForCausalLM.from_pretrained(single)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_zero3_lora_saves_a_loadable_adapter(tmp_path, tiny_model):
    from peft import PeftModel

    out = tmp_path / "zero3-lora"
    assert_ok(run_stage("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", "finetuning_type=lora",
                        "learning_rate=2e-2", f"deepspeed={ZERO3}", "per_device_train_batch_size=2",
                        env={"NPROC": "2", "MASTER_PORT": "29532"}))
    losses = [m["loss"] for m in read_metrics(out)]
    assert losses[-1] < losses[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
