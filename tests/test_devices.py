"""The GPU paths that a CPU can check: collectives on the process group's device, models loaded on the requested
device and dtype, PPO's logits only where the response is, and the loss scaler of fp16 without DeepSpeed."""
from __future__ import annotations

import ast
from pathlib import Path
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


# --------------------------------------------------------------------------------------------- collectives
@pytest.mark.parametrize("config, device_type", [("nccl", "cuda"), ("cuda:nccl", "cuda"), ("cpu:gloo,cuda:nccl", "cpu"),
                                                 ("gloo", "cpu"), ("cpu:gloo", "cpu"), ("cuda:gloo", "cuda")])
def test_the_collective_device_is_one_the_group_has_a_backend_for(config, device_type):
    from stages.common.distributed import collective_device_type

    assert collective_device_type(config) == device_type


def test_a_cpu_tensor_fails_on_a_group_without_a_cpu_backend():
    """What every DeepSpeed run on GPUs would hit at its first metric all-reduce: reproduced on a CPU with a gloo group
    registered for CUDA only, the device type an NCCL group has."""
    code = (
        "import os, torch, torch.distributed as dist\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
        "dist.init_process_group('cuda:gloo', rank=0, world_size=1)\n"
        "from stages.common.distributed import collective_device_type\n"
        "print(collective_device_type(dist.get_backend_config()))\n"
        "try:\n"
        "    dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))\n"
        "except Exception as err:\n"
        "    print(err)\n")
    from conftest import free_port

    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PORT": str(free_port())})
    lines = result.stdout.splitlines()
    assert lines[0] == "cuda" and "No backend type associated with device type cpu" in lines[1], result.stdout + result.stderr


def test_every_collective_tensor_is_on_the_groups_device(monkeypatch):
    """A spy on dist.all_reduce, with a group whose only device is "meta" (a device a CPU build can make tensors on)."""
    import torch.distributed as dist

    from stages.common import distributed

    seen = []

    class Seen(Exception):
        pass

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Seen

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend_config", lambda *a, **k: "meta:fake")
    monkeypatch.setattr(dist, "all_reduce", spy)
    for call in (lambda: distributed.all_reduce_sum([1.0, 2.0]), lambda: distributed.any_rank(True)):
        with pytest.raises(Seen):
            call()
    assert seen == [torch.device("meta")] * 2


def test_only_distributed_py_calls_torch_distributed():
    """So the device rule above covers every collective tristage makes itself (DeepSpeed makes its own)."""
    offenders = []
    for package in ("stages", "rewards"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "stages" / "common" / "distributed.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.startswith("torch.distributed")]
    assert offenders == []


# --------------------------------------------------------------------------------------------- PPO's passes
@pytest.fixture(scope="module")
def bf16_roles(tiny_model, tmp_path_factory):
    """PPO's separate roles with bf16 and no DeepSpeed (autocast), on the tiny model, and a few prompts."""
    from conftest import FIXTURES

    from stages.common.backbone import load_tokenizer
    from stages.common.config import parse_config
    from stages.common.data import build_prompt_data
    from stages.common.distributed import DistInfo
    from stages.ppo.config import ARGUMENTS
    from stages.ppo.roles import build_roles

    out = tmp_path_factory.mktemp("roles")
    model_args, data_args, backbone, ppo_args, sampling, _rollout, reward_settings, train_args = parse_config(
        ["--config", str(FIXTURES / "ppo_tiny.yaml"), f"model_name_or_path={tiny_model}", f"output_dir={out}", "bf16=true",
         "use_cpu=true"], ARGUMENTS)
    tokenizer = load_tokenizer(model_args)
    roles = build_roles(ppo_args, model_args, backbone, train_args, tokenizer, 4, DistInfo(0, 1, 0), None, reward_settings)
    prompts = build_prompt_data(data_args, tokenizer, seed=0, max_prompt_length=sampling.max_prompt_length).train[:4]
    return roles, tokenizer, prompts, ppo_args, sampling


def test_ppo_computes_logits_only_for_the_response_in_the_compute_dtype(bf16_roles):
    from stages.common.rollout.hf import HFEngine
    from stages.ppo.experience import make_experience

    roles, tokenizer, prompts, ppo_args, sampling = bf16_roles
    assert {p.dtype for p in roles.ref.parameters()} == {torch.bfloat16}  # frozen roles load in the compute dtype
    assert {p.dtype for p in roles.actor.module.parameters()} == {torch.float32}  # trained weights stay float32
    seen = []
    hooks = [model.lm_head.register_forward_hook(lambda module, args, out, who=who: seen.append((who, out.shape[1], out.dtype)))
             for who, model in (("actor", roles.actor.module), ("ref", roles.ref))]
    try:
        engine = HFEngine(roles.generation_model, tokenizer, sampling, 4, torch.device("cpu"))
        experience = make_experience(roles, engine, tokenizer, prompts, ppo_args, sampling, 0.1, 4, torch.device("cpu"))
    finally:
        for hook in hooks:
            hook.remove()
    width = experience.response_ids.shape[1]
    full = experience.prompt_ids.shape[1] + width
    scoring = [(who, length, dtype) for who, length, dtype in seen if length != 1]  # generation's decode steps see 1 token
    assert {who for who, *_ in scoring} == {"actor", "ref"}
    assert all(length == width + 1 < full for _, length, _ in scoring), (seen, width, full)
    assert all(dtype == torch.bfloat16 for _, _, dtype in seen)  # under autocast (no DeepSpeed), generation included


def test_row_by_row_logprobs_and_entropy_equal_the_whole_batch():
    import torch.nn.functional as F

    from stages.common.generation import token_entropy, token_logprobs

    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 5, 11, dtype=torch.bfloat16), torch.randint(0, 11, (3, 5))
    whole = F.log_softmax(logits.float() / 0.7, dim=-1)
    assert torch.allclose(token_logprobs(logits, tokens, 0.7), whole.gather(-1, tokens[..., None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(token_entropy(logits, 0.7), -(whole.exp() * whole).sum(-1), atol=1e-6)


# --------------------------------------------------------------------------------------------- eval's loading
def test_eval_loads_each_model_and_judge_once_on_the_requested_device_and_dtype(tmp_path, tiny_model, monkeypatch):
    import shutil

    from conftest import FIXTURES, run_in_process

    from rewards import model as reward_module
    from stages.common import loading
    from stages.eval import compare

    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)
    loaded = []

    def counting(real, kind):
        def load(*args, **kwargs):
            model = real(*args, **kwargs)
            loaded.append((kind, str(args[0]), {p.dtype for p in model.parameters()}, {p.device.type for p in model.parameters()}))
            return model
        return load

    monkeypatch.setattr(compare, "load_policy", counting(loading.load_policy, "policy"))
    monkeypatch.setattr(reward_module, "load_reward_model", counting(reward_module.load_reward_model, "judge"))
    result = run_in_process("eval", f"models=[{tiny_model},{twin}]", f"judges=[{tiny_model},rule:keyword:e]", "dtype=bfloat16",
                            "device=cpu", f"dataset={FIXTURES / 'alpaca_en_demo_sample.json'}", f"output_dir={tmp_path / 'eval'}",
                            "samples_per_prompt=2", "max_new_tokens=6", "bootstrap_samples=50", config=None)
    assert result.returncode == 0, result.stderr[-2000:]
    # the reference (the first model) is that model, not a second copy; the judge loads once for both models
    assert [(kind, path) for kind, path, *_ in loaded] == [("policy", str(tiny_model)), ("policy", str(twin)), ("judge", str(tiny_model))]
    assert all(dtypes == {torch.bfloat16} and devices == {"cpu"} for *_, dtypes, devices in loaded)
    import json

    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["settings"]["loaded_as"] == {"device": "cpu", "dtype": "bfloat16"}
    assert report["models"][Path(tiny_model).name]["kl_to_reference"]["mean"] == 0.0


@pytest.mark.parametrize("key, value", [("dtype", "float8"), ("device", "gpu"), ("device", "cpu:1")])
def test_eval_refuses_a_device_or_dtype_it_does_not_know(key, value):
    from stages.common.config import parse_config
    from stages.common.errors import ConfigError
    from stages.eval.config import ARGUMENTS

    with pytest.raises(ConfigError, match=f"key '{key}'"):
        parse_config([f"{key}={value}"], ARGUMENTS)


# --------------------------------------------------------------------------------------------- --estimate = loaded
def held_bytes(*models) -> int:
    """Bytes a loaded model holds: parameters, buffers and bitsandbytes' quantization constants, each storage once."""
    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            add(tensor)
            state = getattr(tensor, "quant_state", None)  # 4-bit: absmax, code, offset and the nested state's
            nested = getattr(getattr(state, "state2", None), "__dict__", {})
            for value in [*vars(state).values(), *nested.values()] if state else []:
                add(value)
            add(getattr(tensor, "SCB", None))  # 8-bit: the per-row scales
    return total


SFT_BACKBONES = [["finetuning_type=full"], ["finetuning_type=lora"], ["finetuning_type=qlora"],
                 ["finetuning_type=qlora", "double_quantization=false"], ["finetuning_type=qlora", "quantization_bit=8"],
                 ["finetuning_type=freeze"], ["finetuning_type=ptuning"], ["finetuning_type=ptuning", "prefix_projection=true"],
                 ["finetuning_type=ptuning", "ptuning_version=1"]]


@pytest.mark.parametrize("precision", [[], ["bf16=true", "use_cpu=true"]], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backbone", SFT_BACKBONES, ids=lambda b: "-".join(x.split("=")[1] for x in b))
def test_the_estimate_of_a_backbone_is_the_bytes_it_holds_once_loaded(tiny_model, backbone, precision):
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_SFT

    from stages.common.backbone import apply_backbone, load_pretrained
    from stages.common.config import parse_config
    from stages.common.memory import ModelShape, loaded_weight_bytes, weight_bytes
    from stages.sft.config import ARGUMENTS

    model_args, _data, backbone_args, train_args = parse_config(
        ["--config", str(TINY_SFT), f"model_name_or_path={tiny_model}", "output_dir=/tmp/unused", *backbone, *precision], ARGUMENTS)
    model = apply_backbone(load_pretrained(AutoModelForCausalLM, model_args, backbone_args, train_args), backbone_args, train_args)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model))
    assert held_bytes(model) == loaded_weight_bytes(shape, backbone_args, weight_bytes(train_args))


@pytest.fixture(scope="module")
def adapter_pipeline(tiny_model, tmp_path_factory):
    """An SFT LoRA adapter and a reward-model LoRA adapter (with its head) on the tiny base, as the pipeline leaves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("adapters")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for name, auto, task, heads in (("sft", AutoModelForCausalLM, "CAUSAL_LM", None), ("rm", AutoModelForSequenceClassification, "SEQ_CLS", ["score"])):
        kwargs = {"num_labels": 1} if name == "rm" else {}
        model = get_peft_model(auto.from_pretrained(tiny_model, **kwargs), LoraConfig(task_type=task, r=8, lora_alpha=16,
                                                                                      target_modules="all-linear", modules_to_save=heads))
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return out / "sft", out / "rm"


@pytest.mark.parametrize("mode", [[], ["shared_backbone=true"]], ids=["separate", "shared"])
@pytest.mark.parametrize("precision", [[], ["bf16=true", "use_cpu=true"]], ids=["fp32", "bf16"])
def test_the_estimate_of_ppos_roles_is_the_bytes_they_hold(adapter_pipeline, tiny_model, mode, precision, tmp_path):
    from transformers import AutoConfig

    from conftest import FIXTURES

    from stages.common.backbone import load_tokenizer
    from stages.common.config import parse_config
    from stages.common.distributed import DistInfo
    from stages.common.estimate import estimate_ppo
    from stages.common.memory import ModelShape
    from stages.ppo.config import ARGUMENTS
    from stages.ppo.roles import build_roles

    sft, rm = adapter_pipeline
    configs = parse_config(["--config", str(FIXTURES / "ppo_tiny.yaml"), f"model_name_or_path={sft}", f"reward_model={rm}",
                            "critic_init=reward", "finetuning_type=lora", "reward_normalize=false", f"output_dir={tmp_path}",
                            *mode, *precision], ARGUMENTS)
    model_args, _data, backbone, ppo_args, sampling, _rollout, reward_settings, train_args = configs
    roles = build_roles(ppo_args, model_args, backbone, train_args, load_tokenizer(model_args), 4, DistInfo(0, 1, 0), None,
                        reward_settings)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model))
    rows = estimate_ppo(shape, None, backbone, ppo_args, sampling, train_args, 1, 80).rows
    if mode:
        assert held_bytes(roles.shared) == rows["shared base with the ppo adapter"] + rows["sft, critic and reward adapters, heads"]
    else:
        reward_model = roles.reward.sources[0].scorer.model
        assert held_bytes(roles.actor.module) == rows["actor weights"]
        assert held_bytes(roles.critic.module) == rows["critic weights"]
        assert held_bytes(roles.ref) == rows["reference"]
        assert held_bytes(reward_model) == rows["reward model"]


def test_the_estimate_counts_a_vllm_engine_per_gpu_and_its_sleep():
    from stages.common.estimate import estimate_ppo
    from stages.common.memory import GIB, ModelShape
    from stages.common.rollout import RolloutArguments
    from stages.ppo.config import ARGUMENTS
    from stages.common.config import parse_config
    from conftest import FIXTURES

    configs = parse_config(["--config", str(FIXTURES / "ppo_tiny.yaml"), "model_name_or_path=unused", "output_dir=/tmp/unused",
                            "bf16=true", "use_cpu=true"], ARGUMENTS)
    _model, _data, backbone, ppo_args, sampling, _rollout, _reward, train_args = configs
    shape = ModelShape(hidden=4096, layers=32, intermediate=14336, vocab=128256, heads=32, kv_heads=8, tied_embeddings=False)
    args = (shape, None, backbone, ppo_args, sampling, train_args, 8, 80)
    hf = estimate_ppo(*args)
    share = estimate_ppo(*args, rollout=RolloutArguments(rollout_engine="vllm", vllm_gpu_memory_utilization=0.4))
    assert share.rows["vLLM engine (weights + KV cache)"] == pytest.approx(0.4 * 80 * GIB)
    fixed = estimate_ppo(*args, rollout=RolloutArguments(rollout_engine="vllm", vllm_kv_cache_gb=4))
    assert fixed.rows["vLLM engine (weights + KV cache)"] == pytest.approx(2 * shape.parameters(True) + 4 * GIB)  # bf16 weights
    asleep = estimate_ppo(*args, rollout=RolloutArguments(rollout_engine="vllm", vllm_kv_cache_gb=4, vllm_enable_sleep_mode=True))
    assert "vLLM engine (weights + KV cache)" not in asleep.rows and hf.peak < asleep.peak < fixed.peak


# --------------------------------------------------------------------------------------------- fp16 without DeepSpeed
def test_fp16_without_deepspeed_scales_the_loss_and_checkpoints_the_scaler(tmp_path, tiny_model):
    from conftest import read_metrics, run_in_process

    out = tmp_path / "fp16"
    result = run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", "fp16=true", "use_cpu=true",
                            "save_strategy=steps", "save_steps=6")
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(out / "checkpoint-6" / "engine.pt", weights_only=False)["scaler"]
    assert state is not None and state["scale"] > 1.0  # gradients were scaled up (GradScaler's start is 2**16, halved per overflow)
    losses = [m["loss"] for m in read_metrics(out)]
    assert losses[-1] < losses[0] and all(m["skipped_steps"] == 0 for m in read_metrics(out))  # overflows are not NaN steps


def test_checkpoints_save_and_restore_the_cuda_generators(tmp_path, monkeypatch):
    """On a GPU, sampling and dropout draw from the CUDA generators: a resume restores them (CUDA faked here; the
    real thing is in step 8's GPU tests)."""
    import types

    from stages.common.distributed import DistInfo
    from stages.common.engine import TrainingEngine

    args = types.SimpleNamespace(fp16=False, bf16=False, optim="adamw_torch", optim_args=None, learning_rate=0.1, weight_decay=0.0,
                                 adam_beta1=0.9, adam_beta2=0.999,
                                 adam_epsilon=1e-8, lr_scheduler_type="constant", lr_scheduler_kwargs={}, max_grad_norm=1.0,
                                 get_warmup_steps=lambda steps: 0)
    engine = TrainingEngine(torch.nn.Linear(2, 2), args, 10, DistInfo(0, 1, 0))
    states, restored = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    engine.save_checkpoint(tmp_path / "checkpoint-1", {"global_step": 1})
    engine.load_checkpoint(tmp_path / "checkpoint-1")
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], states))
