"""Each backbone (full, lora, qlora 4-bit and 8-bit, freeze, P-Tuning v2 with and without projection,
P-tuning v1) trains the tiny model — full fine-tuning through launch/run_stage.sh as a user runs it, the others
through the same command in this process: the loss falls, only the intended parameters change, and the output
loads with plain transformers/peft and generates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_ok, read_metrics, run_in_process, run_stage


def base_weights(tiny_model: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_model / "model.safetensors")


def train(tmp_path, tiny_model, *overrides, min_drop: float = 0.02, launcher: bool = False) -> Path:
    out = tmp_path / "out"
    result = (run_stage if launcher else run_in_process)("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", *overrides)
    assert_ok(result)
    losses = [m["loss"] for m in read_metrics(out)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - min_drop, f"loss did not fall: {losses}"
    return out


def generates(model, tokenizer) -> None:
    ids = tokenizer("Hello", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 6


def changed_tensors(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_full_changes_every_tensor(tmp_path, tiny_model):
    out = train(tmp_path, tiny_model, "finetuning_type=full", launcher=True)
    before, after = base_weights(tiny_model), load_file(out / "model.safetensors")
    assert changed_tensors(before, after) == set(before)
    generates(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out))


def test_freeze_last_two_blocks_changes_exactly_those(tmp_path, tiny_model):
    out = train(tmp_path, tiny_model, "finetuning_type=freeze", "freeze_trainable_layers=2", "learning_rate=2e-2")
    before, after = base_weights(tiny_model), load_file(out / "model.safetensors")
    in_last_two = {n for n in before if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert in_last_two and changed_tensors(before, after) == in_last_two
    generates(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out))


def test_freeze_first_blocks_and_name_patterns(tmp_path, tiny_model):
    out = train(tmp_path, tiny_model, "finetuning_type=freeze", "freeze_trainable_layers=-1", "freeze_trainable_modules=[mlp]",
                "freeze_extra_modules=[lm_head]", "learning_rate=2e-2")
    changed = changed_tensors(base_weights(tiny_model), load_file(out / "model.safetensors"))
    assert changed == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                       "model.layers.0.mlp.down_proj.weight", "lm_head.weight"}


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("quantization", [None, "4", "8"], ids=["lora", "qlora-nf4", "qlora-int8"])
def test_lora_and_qlora_change_only_adapted_projections(tmp_path, tiny_model, quantization):
    from peft import PeftModel

    mode = ["finetuning_type=lora"] if quantization is None else ["finetuning_type=qlora", f"quantization_bit={quantization}"]
    out = train(tmp_path, tiny_model, *mode, "learning_rate=2e-2")
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # lora_B starts at zero
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    # The adapter loads onto the plain (unquantized) base, and merging changes only the adapted projections.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    generates(model, AutoTokenizer.from_pretrained(out))
    merged = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    changed = changed_tensors(base_weights(tiny_model), merged)
    assert changed and all(name.split(".")[-2] in LORA_TARGETS for name in changed)
    assert not any("embed_tokens" in n or "norm" in n or "lm_head" in n for n in changed)


@pytest.mark.parametrize("variant", [["ptuning_version=2"], ["ptuning_version=2", "prefix_projection=true"], ["ptuning_version=1"]],
                         ids=["v2-prefix", "v2-projection", "v1-prompt-encoder"])
def test_ptuning_trains_only_the_prompt(tmp_path, tiny_model, variant):
    from peft import PeftModel

    # Input-level virtual tokens (v1) move a random 4-block model's loss only a little; the deep prefix (v2) more.
    out = train(tmp_path, tiny_model, "finetuning_type=ptuning", *variant, "learning_rate=5e-2",
                min_drop=0.008 if "ptuning_version=1" in variant else 0.02)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("prompt_encoder" in k or "prompt_embeddings" in k for k in adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Hello there", return_tensors="pt")
    with torch.no_grad():
        plain_logits = base(**ids).logits
    model = PeftModel.from_pretrained(base, out).eval()
    base_after = {k: v for k, v in model.get_base_model().state_dict().items()}
    assert not changed_tensors(base_weights(tiny_model), base_after)  # the base is untouched
    with torch.no_grad():
        prompted_logits = model(**ids).logits[:, -ids["input_ids"].shape[1]:]
    assert not torch.allclose(plain_logits, prompted_logits, atol=1e-4)  # the trained prompt matters
    generates(model, tokenizer)


def test_ptuning_refuses_gradient_checkpointing(tmp_path, tiny_model):
    result = run_stage("sft", f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}", "finetuning_type=ptuning",
                       "gradient_checkpointing=true")
    assert result.returncode == 2
    output = result.stdout + result.stderr  # the stage's own output goes through the launcher's tee, to stdout
    assert "key 'gradient_checkpointing'" in output and "cannot be combined with gradient checkpointing" in output
    assert "Traceback" not in output


def test_lora_with_gradient_checkpointing_trains(tmp_path, tiny_model):
    train(tmp_path, tiny_model, "finetuning_type=lora", "gradient_checkpointing=true", "learning_rate=2e-2")
