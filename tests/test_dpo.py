"""The DPO stage end to end on the tiny model: at the start (policy = reference) the loss is log 2 and every margin 0;
each backbone raises rewards/accuracies on a separable set with the reference it should have (for lora/qlora the
policy with its adapter off); the output loads with plain transformers / peft; bad settings fail in one line. The
losses themselves are tested in test_dpo_losses.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import FIXTURES, assert_ok, read_metrics, run_in_process, run_stage

DPO_TINY = FIXTURES / "dpo_tiny.yaml"
TOPICS = ["the lamp", "a kettle", "my order", "the warranty", "shipping", "a refund", "the color", "a pillow"]


@pytest.fixture(scope="module")
def separable_pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"Can you help with {t}?", "chosen": f"Of course, happy to help with {t}!", "rejected": "No."} for t in TOPICS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("mode", [["finetuning_type=full"], ["finetuning_type=lora", "learning_rate=1e-2"],
                                  ["finetuning_type=qlora", "learning_rate=1e-2"],
                                  ["finetuning_type=freeze", "freeze_trainable_layers=1", "learning_rate=1e-2"]],
                         ids=["full", "lora", "qlora", "freeze"])
def test_each_backbone_raises_the_reward_accuracy_from_log_2(tmp_path, tiny_model, separable_pairs, mode):
    out = tmp_path / "dpo"
    result = run_stage("dpo", f"model_name_or_path={tiny_model}", f"dataset={separable_pairs}", f"output_dir={out}", *mode, config=DPO_TINY)
    assert_ok(result)
    metrics = read_metrics(out)
    first, last = metrics[0], metrics[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0.3 and last["loss"] < first["loss"] - 0.1, last
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in last
    # the output loads as SFT's does
    from stages.common.loading import load_policy

    model = load_policy(str(out))
    assert model(**{"input_ids": __import__("torch").tensor([[1, 2, 3]])}).logits.shape[-1] > 0


@pytest.mark.parametrize("override, key", [("loss_type=kto", "loss_type"), ("beta=0", "beta"), ("label_smoothing=0.5", "label_smoothing"),
                                           ("loss_type=ipo\nlabel_smoothing=0.1", "label_smoothing"), ("rpo_alpha=-1", "rpo_alpha"),
                                           ("finetuning_type=ptuning", "finetuning_type")])
def test_bad_dpo_settings_fail_before_any_model_loads(tmp_path, tiny_model, separable_pairs, override, key):
    result = run_in_process("dpo", f"model_name_or_path={tiny_model}", f"dataset={separable_pairs}", f"output_dir={tmp_path / 'out'}",
                            *override.split("\n"), config=DPO_TINY)
    assert result.returncode == 2 and f"key '{key}'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
