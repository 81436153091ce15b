"""YAML + overrides into typed dataclasses; every TrainingArguments knob reachable; errors name the key."""
from __future__ import annotations

import pytest
import yaml

from stages.common.config import (BackboneArguments, DataArguments, ModelArguments, TrainArguments, parse_config,
                                  save_resolved_config)
from stages.common.errors import ConfigError

from conftest import ROOT

ZERO2 = str(ROOT / "configs" / "deepspeed" / "zero2.json")
SFT = (ModelArguments, DataArguments, BackboneArguments, TrainArguments)


def write(tmp_path, values: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_and_both_override_forms(tmp_path):
    config = write(tmp_path, {"model_name_or_path": "m", "dataset": ["a.json", "b.jsonl"], "finetuning_type": "lora",
                              "learning_rate": 1e-4, "gradient_checkpointing": True, "lora_target": ["q_proj", "v_proj"]})
    model, data, backbone, train = parse_config(
        ["--config", config, "lora_rank=32", "--learning_rate", "3e-4", "dataset=[c.json,d.json]", "--packing", "true"], SFT)
    assert model.model_name_or_path == "m"
    assert data.dataset == ["c.json", "d.json"] and data.packing is True
    assert backbone.finetuning_type == "lora" and backbone.lora_rank == 32 and backbone.lora_target == ["q_proj", "v_proj"]
    assert train.learning_rate == 3e-4 and train.gradient_checkpointing is True


def test_trainer_knobs_are_reachable(tmp_path):
    *_, train = parse_config(["per_device_train_batch_size=3", "gradient_accumulation_steps=5", "bf16=true", "use_cpu=true",
                              f"deepspeed={ZERO2}", "save_steps=7", "seed=11", "report_to=none",
                              "lr_scheduler_type=cosine", "warmup_steps=0.1", "max_grad_norm=0.5",
                              "resume_from_checkpoint=somewhere"], SFT)
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps, train.save_steps, train.seed) == (3, 5, 7, 11)
    assert train.bf16 is True and train.deepspeed == ZERO2 and train.report_to == []
    assert train.max_grad_norm == 0.5 and train.resume_from_checkpoint == "somewhere"


@pytest.mark.parametrize("argv, key", [(["lora_rnak=4"], "lora_rnak"), (["learning_rate=fast"], "learning_rate"),
                                        (["--lr", "1"], "lr")])
def test_unknown_keys_and_bad_values_name_the_key(argv, key):
    with pytest.raises(ConfigError) as err:
        parse_config(argv, SFT)
    assert key in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("learning_rate: [1e-4\n")
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)], SFT)
    assert "broken.yaml" in str(err.value)


def test_resolved_config_round_trips(tmp_path):
    parsed = parse_config(["model_name_or_path=m", "dataset=[x.json]", "finetuning_type=freeze", "freeze_trainable_layers=3",
                           "learning_rate=2e-5", f"output_dir={tmp_path}"], SFT)
    saved = save_resolved_config(str(tmp_path), *parsed)
    again = parse_config(["--config", str(saved)], SFT)
    assert again[0] == parsed[0] and again[1] == parsed[1] and again[2] == parsed[2]
    assert again[3].learning_rate == 2e-5 and again[3].output_dir == str(tmp_path)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "recipes").glob("*/*/*.yaml")), ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_every_gpu_recipe_parses(recipe):
    """Recipes are GPU starting points; use_cpu lets transformers accept their bf16 on a CPU."""
    from stages.common.config import parse_config
    from stages.registry import STAGE_CONFIGS

    extra = [] if recipe.stem == "eval" else ["use_cpu=true"]
    configs = parse_config(["--config", str(recipe), *extra], STAGE_CONFIGS[recipe.stem])
    family, mode = recipe.parent.parent.name, recipe.parent.name
    assert any(getattr(c, "output_dir", "") == f"runs/{family}-{mode}/{recipe.stem}" for c in configs)


@pytest.mark.parametrize("override, key", [("temperature=-1", "temperature"), ("top_p=0", "top_p"), ("top_k=-2", "top_k"),
                                           ("max_new_tokens=0", "max_new_tokens"), ("reward_max_length=0", "reward_max_length"),
                                           ("remote_timeout=0", "remote_timeout"), ("remote_retries=0", "remote_retries"),
                                           ("remote_batch_size=0", "remote_batch_size"), ("kl_estimator=k9", "kl_estimator"),
                                           ("critic_init=nobody", "critic_init"), ("ema_decay=1.0", "ema_decay")])
def test_bad_values_of_stage_keys_name_the_key(override, key):
    from stages.ppo.config import ARGUMENTS

    with pytest.raises(ConfigError) as err:
        parse_config([override], ARGUMENTS)
    assert f"key '{key}'" in str(err.value)


def test_rules_come_from_the_registry_entry_points_and_factories():
    from rewards import rules
    from rewards.sources import RuleSource

    # the demo's judge is an installed rule (pyproject.toml's tristage.rules entry point); rewards never imports the demo
    assert "gold_judge" in rules.known_rules()
    prompt = [{"role": "user", "content": "What is the price of the Zephyr lamp?"}]
    assert RuleSource("rule:gold_judge")([prompt], ["The Zephyr lamp costs $25. Happy to help!"])[0] == [1.3]
    assert RuleSource("rule:keyword:a")([prompt], ["banana"])[0] == [3.0]
    try:
        rules.register_rule("shouting")(lambda p, r: float(r.isupper()))
        assert RuleSource("rule:shouting")([prompt, prompt], ["NO", "yes"])[0] == [1.0, 0.0]
    finally:
        rules.RULES.pop("shouting")
    with pytest.raises(ConfigError, match="unknown rule 'rule:nope'.*gold_judge"):
        RuleSource("rule:nope")


def test_seed_streams_are_one_function():
    from stages.common.seeds import MINIBATCH_ORDER, PROMPT_ORDER, derive_seed

    # the formulas tristage has always used, so a seed reproduces earlier runs
    assert derive_seed(3, PROMPT_ORDER, 2) == 3 * 7919 + 2
    assert derive_seed(3, MINIBATCH_ORDER, 5, 1) == 3 * 100_003 + 5 * 101 + 1
    with pytest.raises(ValueError):
        derive_seed(3, MINIBATCH_ORDER, 5)


STAGE_YAMLS = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if p.stem in ("sft", "rm", "ppo", "eval")]


@pytest.mark.parametrize("config", STAGE_YAMLS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_the_launchers_quick_read_equals_the_typed_config(config, capsys):
    """launch/run_stage.sh reads output_dir and deepspeed without typing the config; they must be what the stage reads."""
    from stages.cli import main

    stage = config.stem
    extra = [] if stage == "eval" else ["use_cpu=true"]
    for overrides in ([], ["output_dir=/tmp/elsewhere", "--deepspeed", "configs/deepspeed/zero2.json"]):
        if stage == "eval" and overrides:
            overrides = overrides[:1]
        assert main(["launch-keys", stage, "--config", str(config), *overrides]) == 0
        quick = capsys.readouterr().out
        assert main(["config-get", stage, "output_dir,deepspeed", "--config", str(config), *extra, *overrides]) == 0
        assert quick == capsys.readouterr().out
