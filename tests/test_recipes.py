"""Multi-GPU readiness without a GPU: every recipe under configs/recipes passes --dry-run and --estimate
(config.json only, no weights), and the estimator's ZeRO model states agree with DeepSpeed's own estimators."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, ROOT, run_stage

RECIPES = ROOT / "configs" / "recipes"
TRAINING_RECIPES = sorted(p for p in RECIPES.glob("*/*/*.yaml") if p.stem != "eval")
FAMILIES = sorted(p.parent for p in RECIPES.glob("*/config.json"))
DATA = {"sft": FIXTURES / "alpaca_en_demo_sample.json", "rm": FIXTURES / "dpo_en_demo_sample.json",
        "ppo": FIXTURES / "alpaca_en_demo_sample.json"}


def recipe_id(path: Path) -> str:
    return str(path.relative_to(RECIPES).with_suffix(""))


def target_hardware(path: Path) -> tuple[int, int, int]:
    """(nodes, GPUs per node, GiB per GPU) from the recipe's '# hardware:' line."""
    match = re.search(r"^# hardware: (\d+) nodes? x (\d+) GPUs x (\d+) GiB", path.read_text(), flags=re.M)
    assert match, f"{path} has no '# hardware:' line"
    return tuple(int(x) for x in match.groups())


def shape_of(family: Path):
    from transformers import AutoConfig

    from stages.common.memory import ModelShape

    return ModelShape.from_config(AutoConfig.from_pretrained(family / "config.json"))


def test_three_families_each_with_full_lora_and_qlora_recipes():
    assert len(FAMILIES) >= 3
    for family in FAMILIES:
        for mode in ("full", "lora", "qlora"):
            assert {"sft", "rm"} <= {p.stem for p in (family / mode).glob("*.yaml")}, family / mode
        assert (family / "qlora" / "ppo.yaml").is_file()  # the shared-backbone PPO
    assert any("70b" in f.name for f in FAMILIES)


# ------------------------------------------------------------------------------- against DeepSpeed's estimators
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_model_shape_counts_what_the_model_holds(family):
    """Parameters and the largest layer, analytically from config.json, vs the model built on the meta device and
    counted the way DeepSpeed's model_to_params counts (it cannot run on meta tensors: their data_ptr is 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = shape_of(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(family / "config.json"))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert shape.parameters() == pytest.approx(total, rel=2e-3)  # Qwen2's q/k/v biases are left out
    assert shape.largest_layer_parameters() == largest


def test_model_shape_matches_deepspeeds_count_of_a_real_model(tiny_model):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    from stages.common.memory import ModelShape

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    total, largest = model_to_params(model)
    shape = ModelShape.from_config(model.config)
    assert (shape.parameters(), shape.largest_layer_parameters()) == (total, largest)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload", ["none", "optimizer", "optimizer+params"])
def test_zero3_model_states_agree_with_deepspeed_within_10_percent(family, gpus_per_node, nodes, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from stages.common.memory import ZeroSettings, model_state_bytes

    shape = shape_of(family)
    total, largest = shape.parameters(), shape.largest_layer_parameters()
    zero = ZeroSettings(3, offload_optimizer=offload != "none", offload_params=offload == "optimizer+params")
    ours = sum(model_state_bytes(total, 0, largest, gpus_per_node * nodes, zero).values())
    _cpu, deepspeed_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus_per_node, nodes, cpu_offload=offload != "none", cpu_offload_params=offload == "optimizer+params")
    assert ours == pytest.approx(deepspeed_gpu, rel=0.10)


@pytest.mark.parametrize("gpus", [1, 8, 32])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_agree_with_deepspeed(gpus, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from stages.common.memory import ZeroSettings, model_state_bytes

    shape = shape_of(RECIPES / "llama3.1-8b")
    ours = sum(model_state_bytes(shape.parameters(), 0, shape.largest_layer_parameters(), gpus, ZeroSettings(2, offload)).values())
    _cpu, deepspeed_gpu = estimate_zero2_model_states_mem_needs(shape.parameters(), gpus, 1, cpu_offload=offload)
    assert ours == pytest.approx(deepspeed_gpu, rel=0.10)


def test_the_estimate_moves_the_right_way_with_each_knob():
    """Checkpointing, LoRA, QLoRA, more ZeRO partitioning and the shared backbone each lower the peak."""
    from stages.common.config import parse_config
    from stages.registry import STAGE_CONFIGS
    from stages.common.estimate import estimate_stage

    def peak(recipe: str, *overrides: str, gpus: int = 8, stage: str = "sft") -> float:
        configs = parse_config(["--config", str(RECIPES / recipe), "use_cpu=true", *overrides], STAGE_CONFIGS[stage])
        return estimate_stage(stage, configs, gpus, 80).peak

    full = "llama3.1-8b/full/sft.yaml"
    assert peak(full) < peak(full, "gradient_checkpointing=false")
    assert peak(full, "finetuning_type=lora") < peak(full)
    assert peak(full, "finetuning_type=qlora") < peak(full, "finetuning_type=lora")
    assert peak(full) < peak(full, f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}")
    assert peak(full, f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3_offload.json'}") < peak(full)
    assert peak(full, gpus=16) < peak(full, gpus=8)
    shared = "llama3.1-8b/qlora/ppo.yaml"
    assert peak(shared, stage="ppo", gpus=1) < peak(shared, "shared_backbone=false", stage="ppo", gpus=1)


# ------------------------------------------------------------------------------- every recipe
@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=recipe_id)
def test_every_recipe_fits_its_target_hardware_by_the_estimate(recipe, tmp_path):
    from stages.cli import estimate

    nodes, gpus_per_node, memory = target_hardware(recipe)
    out = tmp_path / "estimate.json"
    code = estimate([recipe.stem, "--gpus-per-node", str(gpus_per_node), "--nodes", str(nodes), "--gpu-memory", str(memory),
                 "--json", str(out), "--config", str(recipe)])
    report = json.loads(out.read_text())
    assert code == 0 and report["fits"], report
    assert report["gpus"] == nodes * gpus_per_node and report["peak_gib"] < 0.9 * memory
    assert all(v >= 0 for v in report["per_gpu_gib"].values())


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=recipe_id)
def test_every_recipe_passes_a_dry_run_with_no_weights(recipe, tmp_path, tiny_model):
    """In-process (one interpreter for all recipes); the tokenizer and data are test stand-ins, the model skeleton
    is the recipe's own architecture from its shipped config.json."""
    import importlib


    stage = recipe.stem
    module = importlib.import_module({"sft": "stages.sft.train", "rm": "stages.rm.train", "ppo": "stages.ppo.train"}[stage])
    data = tmp_path / "data.json"  # enough records for one optimizer step of the recipe's batch sizes
    data.write_text(json.dumps(json.loads(DATA[stage].read_text()) * 8))
    overrides = [f"tokenizer_name_or_path={tiny_model}", f"dataset={data}", f"output_dir={tmp_path / stage}",
                 "dry_run=true", "use_cpu=true", "val_size=0", "max_length=512", "packing=false"]
    report = module.main(["--config", str(recipe), *overrides])
    assert report["dry_run"] == "ok"
    expected = shape_of(recipe.parents[1]).parameters(lm_head=stage != "rm")
    assert report["total_parameters"] == pytest.approx(expected, rel=0.03)  # + adapters and heads
    if "full" not in recipe.parts:
        assert report["trainable_parameters"] < 0.05 * report["total_parameters"]
    if stage == "ppo":
        assert report["not_found_yet"]  # the recipe's SFT and RM outputs do not exist here
    assert not any((tmp_path / stage).glob("*.safetensors"))


def test_the_launcher_estimates_and_says_when_a_run_does_not_fit():
    recipe = RECIPES / "llama3.1-70b" / "qlora" / "ppo.yaml"
    fits = run_stage("ppo", "--estimate", config=recipe, env={"NUM_GPUS": "1", "GPU_MEMORY_GIB": "80"})
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "fits" in fits.stdout and "shared base" in fits.stdout
    # ZeRO-3 PPO gathers the whole actor for generation: 141 GB of a 70B model does not fit an 80 GB GPU
    zero3 = run_stage("ppo", "--estimate", "shared_backbone=false", "finetuning_type=lora",
                      f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}", config=recipe,
                      env={"NUM_GPUS": "8", "GPU_MEMORY_GIB": "80"})
    assert zero3.returncode == 1 and "does NOT fit" in zero3.stdout


def test_a_recipe_with_a_broken_base_chain_is_a_config_error(tmp_path):
    from stages.common.config import load_yaml
    from stages.common.errors import ConfigError

    (tmp_path / "a.yaml").write_text("base: b.yaml\nlearning_rate: 1.0\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_yaml(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="key 'base'"):
        load_yaml(str(tmp_path / "c.yaml"))
    merged = load_yaml(str(RECIPES / "llama3.1-8b" / "qlora" / "sft.yaml"))
    assert merged["finetuning_type"] == "qlora" and merged["deepspeed"] is None and merged["learning_rate"] == 2.0e-4
