"""Stage 3: PPO on the tiny test model, on CPU. The formulas are tested in test_ppo_math.py; here the
trainer: log-probs, learning under a rule reward, KL control, the shared backbone, resume and NaN guards."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FIXTURES, ROOT, assert_ok, read_metrics, run_stage, run_two_nodes

TINY_PPO = FIXTURES / "ppo_tiny.yaml"


def ppo(*overrides, env=None, config=TINY_PPO):
    return run_stage("ppo", *overrides, config=config, env=env)


def test_prompts_come_from_every_kind_of_record(tiny_model):
    from stages.common.backbone import load_tokenizer
    from stages.common.config import DataArguments, ModelArguments
    from stages.common.data import build_prompt_data

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    for name, last_user in [("alpaca_en_demo_sample.json", None), ("dpo_en_demo_sample.json", None),
                            ("hh_rlhf_sample.jsonl", None), ("messages_sample.jsonl", None)]:
        rows = build_prompt_data(DataArguments(dataset=[str(FIXTURES / name)]), tokenizer, seed=0, max_prompt_length=32).train
        assert rows and all(r["prompt"][-1]["role"] == "user" for r in rows), name
        assert all(0 < len(r["prompt_ids"]) <= 32 for r in rows)
        # the prompt ends with the generation cue of the chat template (the longest prompts were cut from the left)
        assert tokenizer.decode(rows[0]["prompt_ids"]).endswith("### Assistant:\n")


def test_generated_logprobs_equal_an_unpadded_forward(tiny_model):
    """Left padding + position ids from the mask: each row's log-probs match the row run on its own."""
    from transformers import AutoModelForCausalLM

    from stages.common.backbone import load_tokenizer
    from stages.common.config import ModelArguments
    from stages.common.generation import (generate, generation_config, join, left_pad, response_logits, response_mask,
                                          token_logprobs)
    from stages.common.generation import SamplingArguments

    torch.manual_seed(0)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in
               ["How long is the warranty?", "Hi", "What color is the Willow chair and how much does it cost today?"]]
    settings = SamplingArguments(temperature=0.7, max_new_tokens=10)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    assert prompt_mask[1].sum() < prompt_mask.shape[1]  # really padded
    response = generate(model, prompt_ids, prompt_mask, generation_config(settings, tokenizer))
    mask, _ = response_mask(response, tokenizer.eos_token_id)
    with torch.no_grad():
        batched = token_logprobs(response_logits(model(**join(prompt_ids, prompt_mask, response, mask)).logits,
                                                 response.shape[1]), response, 0.7)
        for row, prompt in enumerate(prompts):
            tokens = response[row][mask[row].bool()]
            alone = model(torch.tensor([prompt + tokens.tolist()])).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(alone / 0.7, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
            assert torch.allclose(batched[row][: len(tokens)], expected, atol=1e-5), row


def test_rule_reward_rises_and_a_large_fixed_beta_stays_closer_to_the_reference(tmp_path, tiny_model, keyword_policy):
    free, tied = keyword_policy, tmp_path / "tied"  # free: beta 0.01 (see conftest)
    common = [f"model_name_or_path={tiny_model}", "rollout_batch_size=32", "max_steps=12"]
    # the tied run also exercises the ptx mix and the EMA actor
    assert_ok(ppo(*common, f"output_dir={tied}", "init_kl_coef=1.0", "ptx_coef=0.5",
                  f"ptx_dataset={FIXTURES / 'alpaca_en_demo_sample.json'}", "ema_decay=0.9"))
    free_metrics, tied_metrics = read_metrics(free), read_metrics(tied)
    first = free_metrics[0]["score"]
    last = sum(m["score"] for m in free_metrics[-3:]) / 3
    assert last > 2 * first + 1.0, [m["score"] for m in free_metrics]
    assert tied_metrics[-1]["kl"] < free_metrics[-1]["kl"] / 4
    assert all("ptx_loss" in m and math.isfinite(m["ptx_loss"]) for m in tied_metrics)
    for key in ("kl", "beta", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance",
                "response_length", "no_eos_rate", "rollout_time", "train_time", "tokens_per_second", "score_raw"):
        assert key in free_metrics[-1], key
    assert (free / "training_curves.png").stat().st_size > 10_000
    assert (free / "critic" / "model.safetensors").is_file()

    from safetensors.torch import load_file

    final, averaged = load_file(tied / "model.safetensors"), load_file(tied / "ema" / "model.safetensors")
    assert any(not torch.equal(final[k], averaged[k]) for k in final)


def test_missing_eos_penalty_and_reward_clip(tmp_path, tiny_model):
    """With max_new_tokens=2 almost no response ends; the penalty moves the score by exactly -1 per such response."""
    out = tmp_path / "short"
    assert_ok(ppo(f"model_name_or_path={tiny_model}", f"output_dir={out}", "max_new_tokens=2", "max_steps=1",
                  "missing_eos_penalty=1.0", "reward_clip=0.5", "init_kl_coef=0.0", "gamma=1.0", "lam=1.0",
                  "whiten_advantages=false"))
    metrics = read_metrics(out)[0]
    # reward_total = mean over rollouts of (clip(score) - penalty * no_eos), beta = 0
    assert metrics["no_eos_rate"] > 0.5
    assert metrics["reward_total"] <= 0.5 - metrics["no_eos_rate"] + 1e-6


@pytest.fixture(scope="module")
def lora_stages(tmp_path_factory, tiny_model):
    """An SFT LoRA adapter and a reward-model LoRA adapter, both on the tiny base."""
    out = tmp_path_factory.mktemp("lora_stages")
    sft, rm = out / "sft", out / "rm"
    assert_ok(run_stage("sft", f"model_name_or_path={tiny_model}", f"output_dir={sft}", "finetuning_type=lora", "max_steps=6"))
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tell me about {t}.", "chosen": f"Sure, {t} is nice. Thanks!", "rejected": "No."})
                             + "\n" for t in ["tea", "the lamp", "a kettle", "my order", "shipping", "a refund", "the color", "a pillow"]))
    assert_ok(run_stage("rm", f"model_name_or_path={tiny_model}", f"output_dir={rm}", "finetuning_type=lora", "max_steps=6",
                        f"dataset={pairs}", config=FIXTURES / "rm_tiny.yaml"))
    return sft, rm


def test_shared_backbone_reference_and_reward_equal_the_standalone_models(lora_stages, tiny_model):
    from torch import nn

    from rewards.model import RewardScorer, load_reward_model
    from stages.common.backbone import load_tokenizer
    from stages.common.loading import load_policy
    from stages.common.config import parse_config
    from stages.common.distributed import DistInfo
    from stages.common.generation import join, left_pad, response_mask
    from stages.ppo.config import ARGUMENTS
    from stages.ppo.roles import SharedRoles

    sft, rm = lora_stages
    model_args, _data, backbone, ppo_args, _sampling, _rollout, reward_settings, train_args = parse_config(
        ["--config", str(TINY_PPO), f"model_name_or_path={sft}", f"reward_model={rm}", "critic_init=reward",
         "finetuning_type=lora", "shared_backbone=true", "output_dir=/tmp/unused"], ARGUMENTS)
    tokenizer = load_tokenizer(model_args)
    roles = SharedRoles(ppo_args, model_args, backbone, train_args, tokenizer, steps=10, dist=DistInfo(0, 1, 0), ds_config=None,
                        reward_settings=reward_settings)

    # one base model: a single embedding table serves every role
    embeddings = {id(m.weight) for m in roles.shared.modules() if isinstance(m, nn.Embedding)}
    assert len(embeddings) == 1 and roles.models_in_memory == 1

    # make the PPO adapter non-trivial, so "reference = PPO adapter off" is really tested
    with torch.no_grad():
        for name, param in roles.shared.named_parameters():
            if ".ppo." in name and "lora_B" in name:
                param.normal_(0, 0.5)
    prompts = [tokenizer("Give three tips for staying healthy.", add_special_tokens=False)["input_ids"], [5, 6, 7]]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    response = torch.tensor([[11, 12, tokenizer.eos_token_id], [13, tokenizer.eos_token_id, tokenizer.pad_token_id]])
    inputs = join(ids, mask, response, response_mask(response, tokenizer.eos_token_id)[0])
    standalone = load_policy(str(sft)).eval()
    with torch.no_grad():
        expected = standalone(**inputs).logits
    assert torch.allclose(roles.ref_logits(inputs), expected, atol=1e-5)
    assert not torch.allclose(roles.actor_logits(inputs), expected, atol=1e-3)

    prompt_messages = [[{"role": "user", "content": "Give three tips for staying healthy."}], [{"role": "user", "content": "Hi"}]]
    responses = ["Eat well, sleep, move.", "Hello!"]
    shared_raw, _ = roles.reward(prompt_messages, responses)
    alone = RewardScorer(str(rm), model=load_reward_model(str(rm)), tokenizer=tokenizer).score(prompt_messages, responses)
    assert shared_raw.tolist() == pytest.approx(alone, abs=1e-5)
    # the critic starts as the reward model: same adapter, same head
    values = roles.values(inputs)
    assert torch.isfinite(values).all() and values.abs().sum() > 0


def test_shared_backbone_ppo_runs_and_saves_a_loadable_adapter_stack(tmp_path, lora_stages):
    from stages.common.loading import POLICY_STACK_FILE, load_policy

    sft, rm = lora_stages
    out = tmp_path / "shared"
    result = ppo(f"model_name_or_path={sft}", f"reward_model={rm}", "critic_init=reward", "finetuning_type=lora",
                 "shared_backbone=true", f"output_dir={out}", "max_steps=2", "reward_normalize=true")
    assert_ok(result)
    assert "1 model(s) in memory" in result.stdout + result.stderr
    assert json.loads((out / POLICY_STACK_FILE).read_text())["adapters"] == ["sft", "ppo"]
    policy = load_policy(str(out))
    assert set(policy.peft_config) == {"sft", "ppo"}
    assert all(math.isfinite(m["score"]) for m in read_metrics(out))


def test_ppo_on_an_sft_adapter_with_the_critic_from_the_actor(tmp_path, lora_stages):
    """The critic starts from the SFT policy's CAUSAL_LM adapter on a sequence-classification model (it failed in peft's
    causal-LM wrapper before)."""
    sft, _rm = lora_stages
    out = tmp_path / "critic_from_actor"
    assert_ok(ppo(f"model_name_or_path={sft}", "finetuning_type=lora", "critic_init=actor", f"output_dir={out}", "max_steps=2"))
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(math.isfinite(m["value_loss"]) and m["critic_grad_norm"] > 0 for m in metrics)


@pytest.mark.slow
def test_zero3_ppo_on_two_nodes_saves_checkpoints_one_process_loads(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero3"
    nodes = run_two_nodes("ppo", f"model_name_or_path={tiny_model}", f"output_dir={out}", "max_steps=2", "save_strategy=steps",
                          "save_steps=1", f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}", "per_device_train_batch_size=4",
                          config=TINY_PPO)
    for result in nodes:
        assert_ok(result)
        assert "--nnodes 2" in result.stdout
    assert "2 process(es), ZeRO-3" in nodes[0].stdout + nodes[0].stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    for directory in (out / "checkpoint-1" / "model", out):
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), trained.parameters()))


def run_in_process(tmp_path, tiny_model, *overrides):
    from stages.ppo.train import main

    out = tmp_path / "run"
    main(["--config", str(TINY_PPO), f"model_name_or_path={tiny_model}", f"output_dir={out}", "max_steps=3",
          "save_strategy=steps", "save_steps=1", *overrides])
    return out


def assert_checkpoints_finite(out):
    from safetensors.torch import load_file

    files = list(out.glob("checkpoint-*/model/model.safetensors")) + [out / "model.safetensors"]
    assert len(files) >= 2
    for file in files:
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file


def test_a_nan_reward_skips_the_iteration(tmp_path, tiny_model, monkeypatch):
    from rewards import rules

    calls = {"n": 0}

    def sometimes_nan(prompt, response):
        calls["n"] += 1
        return float("nan") if calls["n"] == 20 else float(response.count("e"))  # one response of iteration 2

    monkeypatch.setitem(rules.RULES, "sometimes_nan", sometimes_nan)
    with pytest.warns(UserWarning, match="iteration is skipped"):
        out = run_in_process(tmp_path, tiny_model, "reward_model=rule:sometimes_nan")
    metrics = read_metrics(out)
    assert metrics[-1]["skipped_iterations"] == 1
    assert all(math.isfinite(m.get("score", 0.0)) for m in metrics)
    assert_checkpoints_finite(out)


@pytest.mark.parametrize("which", ["policy", "value"])
def test_a_nan_loss_skips_the_update(tmp_path, tiny_model, monkeypatch, which):
    from stages.ppo import update

    name = {"policy": "policy_loss", "value": "value_loss"}[which]
    real, calls = getattr(update, name), {"n": 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] == 3 else (loss, stats)

    monkeypatch.setattr(update, name, poisoned)
    with pytest.warns(UserWarning, match=f"non-finite {which} loss"):
        out = run_in_process(tmp_path, tiny_model)
    metrics = read_metrics(out)
    assert sum(m["skipped_updates"] for m in metrics) == 1
    assert all(math.isfinite(m["value_loss"]) and math.isfinite(m["policy_loss"]) for m in metrics)
    assert_checkpoints_finite(out)


def test_a_nan_weight_stops_the_run_on_every_rank_before_a_save(tmp_path, tiny_model, monkeypatch, capsys):
    """The cross-rank check of stages/common/loop.py (a one-rank raise would leave the others in the next gather)."""
    from stages.cli import main
    from stages.ppo import train

    real = train.ppo_update

    def then_nan(roles, *args, **kwargs):
        result = real(roles, *args, **kwargs)
        with torch.no_grad():
            next(p for p in roles.critic.module.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(train, "ppo_update", then_nan)
    code = main(["ppo", "--config", str(TINY_PPO), f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'run'}",
                 "save_strategy=steps", "save_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and "checkpoint-1 (critic)" in err and "NaN/inf" in err, err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_remote_reward_server_round_trip():
    import threading

    from rewards.remote import RemoteReward, RemoteRewardError
    from rewards.server import make_server
    from rewards.sources import build_reward

    local = build_reward(["rule:gold_judge"])
    server = make_server(lambda prompts, responses: local(prompts, responses)[1].tolist(), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/score"
        prompts = [[{"role": "user", "content": "What color is the Willow chair?"}]] * 2
        responses = ["It is green. Thank you for asking!", "No idea"]
        remote = build_reward([url, "rule:gold_judge"], [1.0, -1.0])  # remote minus local: zero
        raw, normalized = remote(prompts, responses)
        assert raw.tolist() == [0.0, 0.0] and normalized.tolist() == [0.0, 0.0]
        assert RemoteReward(url, timeout=60, retries=3, batch_size=64)(prompts, responses) == local(prompts, responses)[0].tolist()
    finally:
        server.shutdown()
    with pytest.raises(RemoteRewardError, match="failed after 1 attempts"):
        RemoteReward("http://127.0.0.1:9/none", timeout=1, retries=1, batch_size=64)(prompts, responses)


@pytest.mark.parametrize("override, key", [
    (["rollout_batch_size=12"], "rollout_batch_size"),
    (["shared_backbone=true"], "shared_backbone"),
    (["critic_init=reward"], "critic_init"),
    (["reward_model=rule:nope"], "reward_model"),
    (["reward_model=/no/such/rm"], "reward_model"),
    (["kl_estimator=k4"], "kl_estimator"),
    (["ptx_coef=0.1"], "ptx_dataset"),
])
def test_bad_ppo_settings_fail_before_any_model_loads(tiny_model, tmp_path, capsys, override, key):
    from stages.cli import main

    code = main(["ppo", "--config", str(TINY_PPO), f"model_name_or_path={tiny_model}", f"output_dir={tmp_path / 'bad'}", *override])
    assert code == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "bad" / "critic").exists()


def test_rollout_logprobs_describe_the_sampler_even_when_the_model_ships_its_own_generation_settings(tmp_path, tiny_model):
    """A checkpoint's generation_config.json (here repetition_penalty 1.3 and no_repeat_ngram_size 2) must not reach
    PPO's sampler, and no minimum length may mask EOS at step 0: the rollout's log-probs (softmax of logits / T) equal
    the sampler's own per-step scores at every step, the first included."""
    import shutil

    from stages.common.backbone import load_tokenizer
    from stages.common.config import parse_config
    from stages.common.data import build_prompt_data
    from stages.common.distributed import DistInfo
    from stages.common.rollout import hf as hf_module
    from stages.ppo import experience as experience_module
    from stages.ppo.config import ARGUMENTS
    from stages.ppo.roles import build_roles

    model_dir = tmp_path / "opinionated"
    shutil.copytree(tiny_model, model_dir)
    settings = json.loads((model_dir / "generation_config.json").read_text())
    settings.update(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3)
    (model_dir / "generation_config.json").write_text(json.dumps(settings))
    model_args, data_args, backbone, ppo_args, sampling, _rollout, reward_settings, train_args = parse_config(
        ["--config", str(TINY_PPO), f"model_name_or_path={model_dir}", f"output_dir={tmp_path / 'out'}", "temperature=0.8",
         "max_new_tokens=10"], ARGUMENTS)
    tokenizer = load_tokenizer(model_args)
    roles = build_roles(ppo_args, model_args, backbone, train_args, tokenizer, 4, DistInfo(0, 1, 0), None, reward_settings)
    prompts = build_prompt_data(data_args, tokenizer, seed=0, max_prompt_length=sampling.max_prompt_length).train
    steps = []
    real = hf_module.generate
    hf_module.generate = lambda *args, **kwargs: real(*args, **kwargs, scores=steps)
    try:
        torch.manual_seed(3)
        engine = hf_module.HFEngine(roles.generation_model, tokenizer, sampling, len(prompts), torch.device("cpu"))
        experience = experience_module.make_experience(roles, engine, tokenizer, prompts, ppo_args, sampling, 0.1, len(prompts),
                                                       torch.device("cpu"))
    finally:
        hf_module.generate = real
    sampler = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in steps], dim=1)  # (B, steps, V)
    sampled = sampler.gather(-1, experience.response_ids[:, : sampler.shape[1], None]).squeeze(-1)
    mask = experience.mask[:, : sampler.shape[1]].bool()
    assert mask[:, 0].all() and mask.sum() > 3 * len(prompts)
    assert torch.allclose(experience.logprobs[:, : sampler.shape[1]][mask], sampled[mask], atol=1e-5)
