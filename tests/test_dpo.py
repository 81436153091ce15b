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
    assert (out / "training_curves.png").stat().st_size > 10_000
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


def response_logp_sum(model, tokenizer, prompt: str, response: str) -> float:
    import torch

    ids = tokenizer(prompt + response, return_tensors="pt")["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[start - 1 :].sum())


def test_a_lora_policy_stacks_on_the_sft_adapter_which_stays_on_in_the_reference(tmp_path, tiny_model, separable_pairs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.common.loading import load_policy

    sft = tmp_path / "sft"
    assert_ok(run_in_process("sft", f"model_name_or_path={tiny_model}", f"output_dir={sft}", "finetuning_type=lora", "max_steps=6",
                             "learning_rate=5e-2"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # the SFT adapter moves log-probs, so a reference without it would show at step 1 as a non-zero margin
    base_logp = response_logp_sum(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer, "Can you help?", " Of course!")
    sft_logp = response_logp_sum(load_policy(str(sft)), tokenizer, "Can you help?", " Of course!")
    assert abs(sft_logp - base_logp) > 0.05

    out = tmp_path / "dpo"
    assert_ok(run_in_process("dpo", f"model_name_or_path={sft}", f"dataset={separable_pairs}", f"output_dir={out}",
                             "finetuning_type=lora", "learning_rate=1e-2", config=DPO_TINY))
    metrics = read_metrics(out)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and metrics[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert metrics[-1]["rewards/accuracies"] == 1.0
    stack = json.loads((out / "tristage_policy.json").read_text())
    assert stack == {"base_model_name_or_path": str(tiny_model), "adapters": ["sft", "dpo"]}
    saved_sft, trained_sft = load_file(out / "sft" / "adapter_model.safetensors"), load_file(sft / "adapter_model.safetensors")
    assert saved_sft.keys() == trained_sft.keys() and all((saved_sft[k] == trained_sft[k]).all() for k in saved_sft)  # frozen
    dpo_logp = response_logp_sum(load_policy(str(out)), tokenizer, "Can you help with the lamp?", " Of course, happy to help with the lamp!")
    sft_pair_logp = response_logp_sum(load_policy(str(sft)), tokenizer, "Can you help with the lamp?", " Of course, happy to help with the lamp!")
    assert dpo_logp > sft_pair_logp  # the stack, as loaded, is the trained policy: the chosen answer became likelier
    # export merges the whole stack (SFT + DPO adapters) into a model plain transformers loads, computing the same function
    merged = tmp_path / "merged"
    assert_ok(run_in_process("export", "--adapter", str(out), "--out", str(merged), config=None))
    merged_logp = response_logp_sum(AutoModelForCausalLM.from_pretrained(merged), tokenizer, "Can you help with the lamp?",
                                    " Of course, happy to help with the lamp!")
    assert merged_logp == pytest.approx(dpo_logp, abs=1e-3)


@pytest.mark.parametrize("mode", [["finetuning_type=full"], ["finetuning_type=lora", "learning_rate=1e-2"]], ids=["full", "lora"])
def test_precomputed_reference_log_probs_give_the_same_run(tmp_path, tiny_model, separable_pairs, mode):
    runs = {}
    for precompute in ("false", "true"):
        out = tmp_path / precompute
        result = run_in_process("dpo", f"model_name_or_path={tiny_model}", f"dataset={separable_pairs}", f"output_dir={out}", *mode,
                                f"precompute_ref_log_probs={precompute}", f"eval_dataset={separable_pairs}", "eval_strategy=steps",
                                "eval_steps=4", config=DPO_TINY)
        assert_ok(result)
        runs[precompute] = read_metrics(out)
        assert ("log-probs precomputed" in result.stdout + result.stderr) == (precompute == "true")
    assert len(runs["true"]) == len(runs["false"]) and any("eval_loss" in m for m in runs["true"])
    for plain, precomputed in zip(runs["false"], runs["true"]):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "eval_loss", "eval_rewards/margins"):
            if key in plain:
                assert precomputed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), (key, plain["step"])


def test_dpo_dry_run_and_estimate(tmp_path, tiny_model, separable_pairs):
    from test_dry_run import dry_run_report

    report = dry_run_report(run_stage("dpo", "--dry-run", f"model_name_or_path={tiny_model}", f"dataset={separable_pairs}",
                                      f"output_dir={tmp_path / 'dpo'}", "finetuning_type=lora", config=DPO_TINY))
    assert report["train_pairs"] == 8 and report["optimizer_steps"] == 8 and report["trainable_parameters"] < report["total_parameters"]
    assert not (tmp_path / "dpo").exists() or not list((tmp_path / "dpo").glob("*.safetensors"))

    from stages.common.config import parse_config
    from stages.common.estimate import estimate_stage
    from stages.dpo.config import ARGUMENTS

    def rows(*overrides):
        configs = parse_config(["--config", str(DPO_TINY), f"model_name_or_path={tiny_model}", "output_dir=/tmp/unused", *overrides], ARGUMENTS)
        est = estimate_stage("dpo", configs, 1, 80.0)
        assert est.fits and est.facts["micro_batch"] == 2 * 4  # both sides of 4 pairs
        return est.rows

    # full: a frozen reference beside the policy, unless its log-probs are precomputed; lora: the policy is its own reference
    full = rows("finetuning_type=full")
    assert 0 < full["reference"] <= full["weights"]  # frozen: in the compute dtype (float32 here: as large as the policy)
    assert "reference" not in rows("finetuning_type=full", "precompute_ref_log_probs=true") and "reference" not in rows("finetuning_type=lora")
    result = run_in_process("estimate", "dpo", "--gpus-per-node", "1", "--gpu-memory", "80", "--config", str(DPO_TINY),
                            f"model_name_or_path={tiny_model}", "output_dir=/tmp/unused", config=None)
    assert result.returncode == 0 and "reference" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["finetuning_type=full"], ["finetuning_type=lora", "learning_rate=1e-2"]], ids=["full", "lora"])
def test_zero3_on_two_processes_matches_one_process(tmp_path, tiny_model, separable_pairs, mode):
    # 2 ranks x micro-batch 2 see the same 4 pairs per micro-step as 1 process x micro-batch 4; the loss is normalized over
    # all ranks' pairs, so the curves agree. full: the reference is a second model under ZeRO-3 inference; lora: the policy
    # with its adapter off, inside the training engine.
    from conftest import free_port

    zero3 = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json")
    common = [f"model_name_or_path={tiny_model}", f"dataset={separable_pairs}", *mode]
    single, sharded = tmp_path / "single", tmp_path / "zero3"
    assert_ok(run_in_process("dpo", *common, f"output_dir={single}", config=DPO_TINY))
    result = run_stage("dpo", *common, f"output_dir={sharded}", f"deepspeed={zero3}", "per_device_train_batch_size=2", config=DPO_TINY,
                       env={"NPROC": "2", "MASTER_PORT": str(free_port())})
    assert_ok(result)
    assert "2 process(es), ZeRO-3" in result.stdout + result.stderr
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert [m[key] for m in read_metrics(sharded)] == pytest.approx([m[key] for m in read_metrics(single)], rel=2e-3, abs=2e-4), key
    from stages.common.loading import load_policy

    load_policy(str(sharded))  # the consolidated output loads in one process


def test_tie_pairs_train_towards_no_preference(tmp_path, tiny_model):
    ties = tmp_path / "ties.jsonl"
    ties.write_text("".join(json.dumps({"prompt": f"Can you help with {t}?", "chosen": f"Of course, happy to help with {t}!",
                                        "rejected": "No.", "tie": True, "margin": 1.0}) + "\n" for t in TOPICS))
    out = tmp_path / "dpo"
    result = run_in_process("dpo", f"model_name_or_path={tiny_model}", f"dataset={ties}", f"output_dir={out}", config=DPO_TINY)
    assert_ok(result)
    assert "8 tie pair(s) train with the label 1/2" in result.stdout + result.stderr and "8 pair(s) carry a margin" in result.stdout + result.stderr
    metrics = read_metrics(out)
    # the same data as preferences reaches margins > 0.3 (test above); as ties the loss stays at its minimum, log 2
    assert all(abs(m["rewards/margins"]) < 0.05 for m in metrics) and metrics[-1]["loss"] == pytest.approx(math.log(2), abs=1e-3)
