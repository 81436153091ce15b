"""The vLLM rollout engine (rollout_engine: vllm). What the engine is given (policy_weights) computes what the policy
computes: full weights, stacked LoRA adapters, QLoRA. The engine samples what the policy would, for checkpoints of five
families, and follows the policy after every PPO update (full, stacked LoRA, QLoRA, the shared backbone, ZeRO-3 on
two processes); a killed run resumes to the same result; what vLLM cannot run is refused in one line.

The tests marked ``vllm`` need vLLM (launch/install.sh --vllm); .ci/run runs them in a second environment that has it.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FIXTURES, ROOT, assert_ok, read_metrics, run_in_process, run_stage

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def needs_vllm(test):
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (launch/install.sh --vllm)")(test))


TINY_PPO = FIXTURES / "ppo_tiny.yaml"
PROMPTS = ["How long is the warranty?", "Hi", "What color is the Willow chair and how much does it cost today?",
           "Give three tips for staying healthy."]


def family_model(kind: str, tiny_model, directory):
    """A tiny random checkpoint of another family, with the test tokenizer (vocabulary 400). Its config names EOS 2, the
    tokenizer's pad token (the tokenizer's EOS is 1): checkpoints whose config and tokenizer disagree on EOS exist
    (Qwen2.5-Instruct), and responses end at the tokenizer's EOS only."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    configs = {"llama": None,
               "qwen2": AutoConfig.for_model("qwen2", **common),
               "gemma2": AutoConfig.for_model("gemma2", head_dim=32, **common),
               "glm4": AutoConfig.for_model("glm4", head_dim=32, **common),
               "gpt2": AutoConfig.for_model("gpt2", vocab_size=400, n_embd=64, n_layer=2, n_head=2, n_positions=256,
                                            bos_token_id=0, eos_token_id=2)}
    if configs[kind] is None:
        return tiny_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[kind])
    with torch.no_grad():  # wider than the usual 0.02 init: near-flat logits would leave greedy decoding to rounding
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
        if kind == "gemma2":  # Gemma scales embeddings by sqrt(hidden): unscaled, each token's own tied embedding
            model.get_input_embeddings().weight.div_(configs[kind].hidden_size ** 0.5)  # outvotes every layer
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, directory / name)
    return directory


def hf_greedy(model, prompts, eos, new_tokens):
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        row = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             eos_token_id=eos, pad_token_id=eos)[0, len(prompt):].tolist()
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def assert_greedy_matches(model, prompts, engine_rows, hf_rows, tie=1e-2):
    """The engine's greedy tokens are the policy's, up to a near-tie: where they first part, the policy's own two best
    logits lie within `tie` (fp32 kernels round differently; a clear preference must be followed)."""
    for prompt, engine_row, hf_row in zip(prompts, engine_rows, hf_rows):
        if engine_row == hf_row:
            continue
        at = next((i for i, (a, b) in enumerate(zip(engine_row, hf_row)) if a != b), min(len(engine_row), len(hf_row)))
        top2 = logits_of(model, [prompt + hf_row[:at]])[0, -1].topk(2).values
        assert top2[0] - top2[1] < tie, f"engine left the policy's greedy path at token {at}: {engine_row} vs {hf_row}"


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float()


# ---- what the engine is given: needs no vLLM ----

def stacked_lora(base_path, seed=0):
    """An 'sft' and a 'ppo' LoRA adapter, both active, on every linear layer, with non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                           adapter_name="sft")
    model.add_adapter("ppo", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    model.base_model.set_adapter(["sft", "ppo"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_streamed_weights_of_a_stacked_lora_policy_compute_its_logits(kind, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from stages.common.rollout.weights import policy_weights

    path = family_model(kind, tiny_model, tmp_path)
    policy = stacked_lora(path)
    weights = dict(policy_weights(policy))
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in name for name in missing)  # a tied head is the embeddings
    assert not any("lora" in name or "base_layer" in name for name in weights)
    ids = [[0, 5, 9, 17, 33, 40]]
    assert not torch.allclose(logits_of(plain, ids), logits_of(AutoModelForCausalLM.from_pretrained(path), ids), atol=1e-3)
    assert torch.allclose(logits_of(plain, ids), logits_of(policy, ids), atol=1e-4)
    # with the adapters off the stream is the base model (the reference of the shared backbone)
    with policy.disable_adapter():
        base = dict(policy_weights(policy))
    original = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(base[name], original[name]) for name in base)


def test_streamed_weights_of_a_qlora_policy_are_its_dequantized_base_plus_adapters(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stages.common.backbone import one_cpu_kernel
    from stages.common.rollout.weights import policy_weights

    quantized = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    one_cpu_kernel(quantized)  # as load_pretrained does
    torch.manual_seed(0)
    policy = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    ids = [[0, 5, 9, 17, 33, 40]]
    training = policy.train()(torch.tensor(ids)).logits.detach()
    policy.eval()
    # PPO's scoring pass (eval, no grad) computes what its update computes (train mode): the first ratio is 1
    assert torch.equal(logits_of(policy, ids), training)
    weights = dict(policy_weights(policy))
    assert all(t.dtype == torch.float32 for t in weights.values())
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    plain.load_state_dict(weights, strict=False)
    # 4-bit really changed the weights, and the stream carries the 4-bit values, not the checkpoint's
    assert not torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(tiny_model), ids), logits_of(policy, ids), atol=1e-2)
    assert torch.allclose(logits_of(plain, ids), logits_of(policy, ids), atol=1e-4)


@pytest.mark.vllm  # also in the vLLM environment, whose transformers (below 5.20) runs Gemma2 through sdpa by default
def test_a_checkpoint_that_soft_caps_attention_loads_with_the_cap(tiny_model, tmp_path):
    """Gemma2 caps its attention logits; sdpa drops the cap. Policy and reward model load it with eager attention,
    computing what the checkpoint computes (and what vLLM samples)."""
    from transformers import AutoModelForCausalLM

    from rewards.model import load_reward_model
    from stages.common.loading import load_policy

    path = family_model("gemma2", tiny_model, tmp_path / "gemma2")
    ids = [[5, 17, 33, 44, 91, 120, 7, 8, 9, 10, 11, 12]]
    policy = load_policy(str(path))
    assert policy.config._attn_implementation == "eager"
    capped = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert torch.allclose(logits_of(policy, ids), logits_of(capped, ids), atol=1e-6)
    assert load_reward_model(str(path)).model.config._attn_implementation == "eager"


def test_sdpa_for_a_checkpoint_that_soft_caps_attention_is_refused(tiny_model, tmp_path):
    path = family_model("gemma2", tiny_model, tmp_path / "gemma2")
    result = run_in_process("ppo", f"model_name_or_path={path}", f"output_dir={tmp_path / 'out'}", "attn_implementation=sdpa",
                            config=TINY_PPO)
    assert result.returncode == 2, result.stderr
    assert "key 'attn_implementation'" in result.stderr and "soft-caps" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_without_vllm_the_vllm_engine_is_refused_in_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` does where it is not installed
    result = run_in_process("ppo", f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}", "rollout_engine=vllm",
                            config=TINY_PPO)
    assert result.returncode == 2
    assert "key 'rollout_engine': vLLM is not installed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, key", [("vllm_kv_cache_gb=1", "vllm_kv_cache_gb"), ("rollout_is_cap=2", "rollout_is_cap"),
                                           ("vllm_enable_sleep_mode=true", "vllm_enable_sleep_mode")])
def test_vllm_keys_without_the_vllm_engine_are_refused(tiny_model, tmp_path, override, key):
    result = run_in_process("ppo", f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'out'}", override, config=TINY_PPO)
    assert result.returncode == 2 and f"key '{key}'" in result.stderr


# ---- the engine itself ----

@needs_vllm
def test_gpt2_whose_weights_vllm_reloads_wrong_is_refused(tiny_model, tmp_path):
    """vLLM 0.32 reloads GPT-2's Conv1D weights wrong (its greedy tokens differed from the policy's after a reload):
    refused in one line rather than sampled from another model."""
    path = family_model("gpt2", tiny_model, tmp_path)
    result = run_in_process("ppo", f"model_name_or_path={path}", f"output_dir={tmp_path / 'out'}", "rollout_engine=vllm",
                            config=TINY_PPO)
    assert result.returncode == 2 and "GPT2LMHeadModel: vLLM 0.32's in-place weight reload" in result.stderr


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "glm4"])
@needs_vllm
def test_the_engine_samples_what_the_policy_would_and_follows_new_weights(kind, tiny_model, tmp_path):
    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments
    from stages.common.generation import SamplingArguments
    from stages.common.loading import load_policy
    from stages.common.rollout import RolloutArguments
    from stages.common.rollout.vllm_engine import VLLMEngine
    from stages.common.rollout.weights import policy_weights

    path = family_model(kind, tiny_model, tmp_path)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(path)))
    model = load_policy(str(path)).eval()  # as the stages load it (Gemma2: eager, which keeps its attention soft-cap)
    sampling = SamplingArguments(temperature=0.7, max_new_tokens=16, max_prompt_length=32)
    engine = VLLMEngine(str(path), tokenizer, sampling, RolloutArguments(rollout_engine="vllm"), torch.float32, rows=8, seed=0)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    eos = tokenizer.eos_token_id

    engine.load_weights(policy_weights(model))
    before = hf_greedy(model, prompts, eos, 16)
    assert_greedy_matches(model, prompts, engine.generate(prompts, 1, seed=0, greedy=True).response_ids, before)

    # an "update": the engine must now sample the new policy, not the one it was given first
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * param.std().clamp(min=0.05))
    after = hf_greedy(model, prompts, eos, 16)
    assert after != before
    engine.load_weights(policy_weights(model))
    assert_greedy_matches(model, prompts, engine.generate(prompts, 1, seed=0, greedy=True).response_ids, after)

    # sampled at temperature 0.7: the engine's log-probs are the policy's log_softmax(logits / 0.7), and a seed repeats
    sampled = engine.generate(prompts, 2, seed=3)
    assert engine.generate(prompts, 2, seed=3).response_ids == sampled.response_ids
    assert sampled.response_ids[0] != sampled.response_ids[1] or sampled.response_ids[2] != sampled.response_ids[3]
    for row, (tokens, logprobs) in enumerate(zip(sampled.response_ids, sampled.logprobs)):
        prompt = prompts[row // 2]
        logits = logits_of(model, [prompt + tokens])[0, len(prompt) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4), row


@needs_vllm
def test_a_call_with_more_prompt_tokens_than_one_engine_step_takes(tiny_model):
    """Eval's and collect's calls hold many prompts; vLLM schedules them over several steps, each row seeded."""
    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments
    from stages.common.generation import SamplingArguments
    from stages.common.rollout import RolloutArguments
    from stages.common.rollout.vllm_engine import VLLMEngine

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    engine = VLLMEngine(str(tiny_model), tokenizer, SamplingArguments(temperature=1.0, max_new_tokens=8, max_prompt_length=120),
                        RolloutArguments(rollout_engine="vllm"), torch.float32, rows=64, seed=0)
    prompts = [[5 + (i + j) % 300 for j in range(110)] for i in range(64)]
    assert len(prompts) * 110 > engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    first = engine.generate(prompts, 2, seed=1)
    assert len(first.response_ids) == 128 and engine.generate(prompts, 2, seed=1).response_ids == first.response_ids


@needs_vllm
def test_an_architecture_vllm_lacks_is_refused_before_any_model_loads(tmp_path, tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.for_model("xglm", vocab_size=400, d_model=64, num_layers=2, attention_heads=2, ffn_dim=128)
    config.architectures = ["XGLMForCausalLM"]
    config.save_pretrained(tmp_path / "xglm")
    result = run_in_process("ppo", f"model_name_or_path={tmp_path / 'xglm'}", f"tokenizer_name_or_path={tiny_model}",
                            f"output_dir={tmp_path / 'out'}", "rollout_engine=vllm", config=TINY_PPO)
    assert result.returncode == 2
    assert "has no model for XGLMForCausalLM" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- PPO with the engine ----

def ppo(*overrides, env=None):
    return run_stage("ppo", *overrides, config=TINY_PPO, env=env, timeout=900)


def assert_engine_followed_the_actor(out, tolerance):
    """Every iteration's rollouts were sampled by the actor as it was then: the engine's log-probs of the sampled tokens
    equal the actor's (a stale engine would be off by the update's change, ~0.1 here after the first update)."""
    metrics = read_metrics(out)
    assert len(metrics) >= 4
    gaps = [m["rollout_logprob_diff_max"] for m in metrics]
    assert max(gaps) < tolerance, gaps
    assert metrics[-1]["kl"] > 0.05  # the actor really moved away from where the engine started
    return metrics


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("vllm_sft") / "sft"
    assert_ok(run_stage("sft", f"model_name_or_path={tiny_model}", f"output_dir={out}", "finetuning_type=lora", "max_steps=6"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora-stacked", "qlora", "shared-backbone"])
@needs_vllm
def test_ppo_rollouts_by_vllm_follow_the_actor(mode, tmp_path, tiny_model, request):
    settings = {"full": [f"model_name_or_path={tiny_model}"],
                "lora-stacked": [f"model_name_or_path={request.getfixturevalue('sft_adapter')}", "finetuning_type=lora"],
                "qlora": [f"model_name_or_path={tiny_model}", "finetuning_type=qlora"],
                "shared-backbone": [f"model_name_or_path={request.getfixturevalue('sft_adapter')}", "finetuning_type=lora",
                                    "shared_backbone=true"]}[mode]
    out = tmp_path / "ppo"
    result = ppo(*settings, f"output_dir={out}", "rollout_engine=vllm", "rollout_batch_size=32", "max_steps=8")
    assert_ok(result)
    assert "rollouts by vllm" in result.stdout + result.stderr
    metrics = assert_engine_followed_the_actor(out, 1e-3 if mode == "qlora" else 1e-4)
    if mode == "full":  # the rule reward ("e" count) rises as with the hf engine
        assert sum(m["score"] for m in metrics[-3:]) / 3 > metrics[0]["score"] + 1.0, [m["score"] for m in metrics]


@pytest.mark.slow
@needs_vllm
def test_zero3_ppo_on_two_processes_gives_each_engine_the_gathered_actor(tmp_path, tiny_model):
    out = tmp_path / "zero3"
    result = ppo(f"model_name_or_path={tiny_model}", f"output_dir={out}", "rollout_engine=vllm", "max_steps=4",
                 f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}", "per_device_train_batch_size=4",
                 env={"NPROC": "2", "OMP_NUM_THREADS": "1", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert_ok(result)
    assert "2 process(es), ZeRO-3" in result.stdout + result.stderr
    assert_engine_followed_the_actor(out, 1e-4)  # the max over both ranks


@pytest.mark.slow
@needs_vllm
def test_a_killed_vllm_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model):
    common = [f"model_name_or_path={tiny_model}", "rollout_engine=vllm", "max_steps=6", "save_strategy=steps", "save_steps=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(ppo(*common, f"output_dir={straight}"))

    command = [str(ROOT / "launch" / "run_stage.sh"), "ppo", "--config", str(TINY_PPO), *common, f"output_dir={killed}"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, "NUM_GPUS": "0"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "finished before the kill"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "trainer_state.json").exists()
    assert_ok(ppo(*common, f"output_dir={killed}", "resume_from_checkpoint=last"))

    done = {m["step"]: m for m in read_metrics(straight)}
    resumed = {}
    for m in read_metrics(killed):
        resumed.setdefault(m["step"], {}).update(m)
    for key in ("score", "kl", "policy_loss", "value_loss", "response_length"):
        assert resumed[6][key] == pytest.approx(done[6][key], rel=1e-5, abs=1e-7), key
