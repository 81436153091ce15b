"""Faults during a run: NaN/inf steps are skipped and counted, too many in a row stop the run with one line;
a failing save (a full disk) keeps the previous checkpoint; out-of-memory names the knobs. Exit code 3."""
from __future__ import annotations

import errno
import json

import torch

from conftest import FIXTURES, TINY_SFT
from stages.cli import main as tristage

TINY_PPO = FIXTURES / "ppo_tiny.yaml"


def sft(tmp_path, tiny_model, *overrides) -> tuple[int, object]:
    out = tmp_path / "sft"
    return tristage(["sft", "--config", str(TINY_SFT), f"model_name_or_path={tiny_model}", f"output_dir={out}", *overrides]), out


def all_finite(directory) -> bool:
    from safetensors.torch import load_file

    files = list(directory.rglob("*.safetensors"))
    assert files, directory
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


def test_nan_losses_are_skipped_counted_and_never_saved(tmp_path, tiny_model, monkeypatch):
    from stages.common.lm import CausalLMObjective

    real, calls = CausalLMObjective.loss_sum, {"n": 0}

    def sometimes_nan(self, model, batch):
        calls["n"] += 1
        loss, extra = real(self, model, batch)
        return (loss * float("nan"), extra) if calls["n"] in (3, 4, 9) else (loss, extra)  # windows 2 and 5 of 12

    monkeypatch.setattr(CausalLMObjective, "loss_sum", sometimes_nan)
    code, out = sft(tmp_path, tiny_model, "save_strategy=steps", "save_steps=4")
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_steps"] == 2 and all(m["loss"] == m["loss"] for m in metrics if m["step"] not in (2, 5))
    assert all_finite(out)  # the final model and every checkpoint


def test_nan_in_a_row_stops_with_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    from stages.common.lm import CausalLMObjective

    real = CausalLMObjective.loss_sum
    monkeypatch.setattr(CausalLMObjective, "loss_sum", lambda self, m, b: (real(self, m, b)[0] * float("inf"), {}))
    code, out = sft(tmp_path, tiny_model, "max_nonfinite_steps=3")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith("tristage: error: 3 optimizer steps in a row were NaN/inf (last at step 3)")
    assert not (out / "model.safetensors").exists()


def test_ppo_stops_after_nan_rewards_in_a_row(tmp_path, tiny_model, monkeypatch, capsys):
    from rewards import rules

    monkeypatch.setitem(rules.RULES, "always_nan", lambda prompt, response: float("nan"))
    code = tristage(["ppo", "--config", str(TINY_PPO), f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'ppo'}",
                     "reward_model=rule:always_nan", "max_nonfinite_steps=2"])
    assert code == 3 and "2 PPO iterations in a row were NaN/inf" in capsys.readouterr().err


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch, capsys):
    from stages.common.engine import TrainingEngine

    real, saves = TrainingEngine.save_checkpoint, {"n": 0}

    def disk_fills_up(self, directory, client_state):
        saves["n"] += 1
        real(self, directory, client_state)
        if saves["n"] == 2:  # the second checkpoint is half written when the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TrainingEngine, "save_checkpoint", disk_fills_up)
    code, out = sft(tmp_path, tiny_model, "save_strategy=steps", "save_steps=4")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and "No space left on device" in err and "checkpoint-4 is intact" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # no half-written checkpoint-8(.tmp)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    monkeypatch.setattr(TrainingEngine, "save_checkpoint", real)
    code, out = sft(tmp_path, tiny_model, "save_strategy=steps", "save_steps=4", "resume_from_checkpoint=last")
    assert code == 0 and all_finite(out)  # and the run resumes from it once there is space


def test_out_of_memory_names_the_knobs(tmp_path, tiny_model, monkeypatch, capsys):
    from stages.common.lm import CausalLMObjective

    def no_memory(self, model, batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    monkeypatch.setattr(CausalLMObjective, "loss_sum", no_memory)
    code, _ = sft(tmp_path, tiny_model)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and err.startswith("tristage: error: out of memory")
    for knob in ("per_device_train_batch_size", "gradient_checkpointing", "qlora", "zero3_offload.json", "--estimate"):
        assert knob in err


def test_nan_weights_are_never_saved_or_exported(tmp_path, tiny_model, capsys):
    """The guards behind the skip logic: a model that somehow holds a NaN is refused at every save and at export."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.common.errors import RunError
    from stages.common.export import export_merged
    from stages.common.loop import check_finite_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    check_finite_weights(model, "a healthy model")  # no error
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    try:
        check_finite_weights(model, "checkpoint-3")
        raise AssertionError("a NaN weight was accepted")
    except RunError as err:
        assert "checkpoint-3" in str(err) and "NaN/inf" in str(err)

    adapter = tmp_path / "adapter"
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.fill_(float("inf"))
    peft.save_pretrained(adapter)
    try:
        export_merged(str(adapter), str(tmp_path / "merged"), base=str(tiny_model))
        raise AssertionError("a non-finite merge was exported")
    except RunError as err:
        assert "nothing exported" in str(err)
    assert not (tmp_path / "merged" / "model.safetensors").exists()
