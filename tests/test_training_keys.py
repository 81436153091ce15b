"""Every transformers.TrainingArguments key either works in tristage or is refused, naming it: optimizers (torch,
Adafactor, bitsandbytes' 8-bit and paged ones) and their arguments, checkpointing kwargs, NEFTune, label smoothing,
wandb and MLflow, model-only checkpoints and the best checkpoint at the end."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from conftest import FIXTURES, ROOT, read_metrics, run_in_process

def stage_arguments(stage: str):
    from stages.registry import STAGE_CONFIGS

    return STAGE_CONFIGS[stage]


def non_default(field) -> str:
    """A value other than the field's default, in the form an override takes."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        return str(not default).lower()
    if isinstance(default, (int, float)):
        return str(default + 1)
    return {"bool": "true", "int": "3", "float": "0.5"}.get(next((t for t in ("bool", "int", "float") if t in str(field.type)), ""), "x")


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_every_trainer_key_is_honored_or_refused(stage):
    """A walk over dataclasses.fields(TrainingArguments): a key a stage does not honor, set to anything, is one
    error naming it; a key it honors is in the README's configuration section."""
    from transformers import TrainingArguments

    from stages.common.config import parse_config
    from stages.common.errors import ConfigError

    arguments = stage_arguments(stage)
    train_type = arguments[-1]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration"):readme.index("## Launching")]
    fields = [f for f in dataclasses.fields(TrainingArguments) if f.init]
    assert len(fields) > 100
    for field in fields:
        if field.name in train_type.honored:
            assert f"`{field.name}`" in section, f"{field.name} is honored but not listed in the README"
            continue
        with pytest.raises(ConfigError) as err:
            parse_config([f"{field.name}={non_default(field)}"], arguments)
        assert f"key '{field.name}'" in str(err.value) and "does not use" in str(err.value), (field.name, str(err.value))


OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "lion_8bit"]


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_each_optimizer_trains(tmp_path, tiny_model, optim):
    extra = {"sgd": ["optim_args=momentum=0.9", "learning_rate=0.2"], "adafactor": ["learning_rate=0.02"]}.get(optim, [])
    out = tmp_path / optim
    result = run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", "finetuning_type=lora",
                            "learning_rate=0.02", f"optim={optim}", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [m["loss"] for m in read_metrics(out)]
    assert losses[-1] < losses[0], (optim, losses)


def test_optim_args_reach_the_optimizer_and_bad_ones_are_refused():
    import types

    from stages.common.config import parse_config
    from stages.common.errors import ConfigError
    from stages.common.optimizers import make_optimizer

    args = types.SimpleNamespace(optim="sgd", optim_args="momentum=0.9,nesterov=true", learning_rate=0.1, weight_decay=0.0,
                                 adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3, 3))], args)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"] is True
    with pytest.raises(ConfigError, match="key 'optim_args'.*momentun"):
        parse_config(["optim=sgd", "optim_args=momentun=0.9"], stage_arguments("sft"))
    from stages.common.distributed import DistInfo
    from stages.common.engine import resolve_deepspeed_config

    *_, train_args = parse_config(["optim=paged_adamw_8bit", f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"],
                                  stage_arguments("sft"))
    with pytest.raises(ConfigError, match="key 'optim'"):  # DeepSpeed partitions optimizer states itself
        resolve_deepspeed_config(train_args, DistInfo(0, 1, 0))


def test_gradient_checkpointing_kwargs_are_passed_on(tiny_model):
    from transformers import AutoModelForCausalLM

    from stages.common.backbone import prepare_for_training
    from stages.common.config import parse_config

    *_, backbone, train_args = parse_config(["gradient_checkpointing=true", 'gradient_checkpointing_kwargs={"use_reentrant": true}'],
                                            stage_arguments("sft"))
    model = prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_model), backbone, train_args)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {"use_reentrant": True}


def test_label_smoothing_matches_the_smoothed_target_and_only_while_training(tmp_path, tiny_model):
    from stages.common.lm import token_nll_sum

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 3] = -100
    naive = 0.0
    for b in range(2):
        for t in range(4):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            logp = torch.log_softmax(logits[b, t].double(), dim=-1)
            naive += -(0.9 * logp[target] + 0.1 * logp.mean()).item()
    assert token_nll_sum(logits, labels, 0.1).item() == pytest.approx(naive, rel=1e-6)

    runs = {}
    for smoothing in ("0.0", "0.2"):
        out = tmp_path / smoothing
        assert run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", f"label_smoothing_factor={smoothing}",
                              f"eval_dataset={FIXTURES / 'alpaca_en_demo_sample.json'}", "eval_strategy=steps",
                              "eval_steps=12").returncode == 0
        runs[smoothing] = read_metrics(out)[-1]
    # once the model is confident, the smoothed target (0.2 spread over 400 tokens) costs much more than the plain one;
    # eval reports the plain likelihood either way
    assert runs["0.2"]["loss"] > runs["0.0"]["loss"] + 0.3
    assert abs(runs["0.2"]["eval_loss"] - runs["0.0"]["eval_loss"]) < 0.2 < runs["0.2"]["loss"] - runs["0.2"]["eval_loss"]
    assert runs["0.2"]["eval_perplexity"] == pytest.approx(math.exp(runs["0.2"]["eval_loss"]))


def test_neftune_puts_noise_on_the_embeddings_while_training(tmp_path, tiny_model):
    losses = {}
    for alpha in ("", "neftune_noise_alpha=15"):
        out = tmp_path / (alpha or "plain")
        assert run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", "max_steps=2",
                              *([alpha] if alpha else [])).returncode == 0
        losses[alpha] = [m["loss"] for m in read_metrics(out)]
    assert losses[""][0] != losses["neftune_noise_alpha=15"][0]  # the first step already sees the noisy embeddings


def test_wandb_offline_and_mlflow_file_store_receive_the_metrics(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for opt-in use
    out = tmp_path / "run"
    result = run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", "max_steps=3", "report_to=[wandb,mlflow]",
                            "run_name=tracked", "project=tristage-test")
    assert result.returncode == 0, result.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    [run] = client.search_runs([client.get_experiment_by_name("tristage-test").experiment_id])
    assert run.info.run_name == "tracked" and run.data.params["learning_rate"] == "0.005"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    [offline] = list((tmp_path / "wandb").glob("offline-run-*"))
    assert list(offline.glob("*.wandb"))  # wandb's offline log of the run, for `wandb sync`


def test_save_only_model_checkpoints_load_as_models_and_refuse_to_resume(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    common = [f"model_name_or_path={tiny_model}", f"output_dir={out}", "save_strategy=steps", "save_steps=6", "save_only_model=true"]
    assert run_in_process("sft", *common).returncode == 0
    checkpoint = out / "checkpoint-6"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "engine.pt").exists()
    assert all(torch.isfinite(p).all() for p in AutoModelForCausalLM.from_pretrained(checkpoint).parameters())
    result = run_in_process("sft", *common[:-1], f"resume_from_checkpoint={checkpoint}")
    assert result.returncode == 2 and "save_only_model" in result.stderr and "key 'resume_from_checkpoint'" in result.stderr


def test_load_best_model_at_end_keeps_and_loads_the_best_checkpoint(tmp_path, tiny_model):
    """greater_is_better with eval loss picks the worst loss: the first checkpoint, before training brought it down."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", "save_strategy=steps", "save_steps=4",
                            "eval_strategy=steps", "eval_steps=4", f"eval_dataset={FIXTURES / 'alpaca_en_demo_sample.json'}",
                            "load_best_model_at_end=true", "metric_for_best_model=loss", "greater_is_better=true",
                            "save_total_limit=1")
    assert result.returncode == 0, result.stderr[-2000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(out / "checkpoint-4")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]  # the best survives the limit
    best = torch.load(out / "checkpoint-4" / "engine.pt", weights_only=False)["model"]
    final = load_file(out / "model.safetensors")
    assert all(torch.equal(best[name], final[name]) for name in best)
    evals = [m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m]
    assert state["best_metric"] == pytest.approx(max(evals[:2]))


def test_disable_tqdm_turns_the_progress_bar_off(tmp_path, tiny_model):
    bars = {}
    for flag in ("false", "true"):
        result = run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / flag}", "max_steps=2",
                                f"disable_tqdm={flag}")
        bars[flag] = bool(re.search(r"sft .*2/2", result.stderr))
    assert bars == {"false": True, "true": False}
