"""Stage 2 end to end on the tiny model: each backbone learns a separable set, the outputs load as
AutoModelForSequenceClassification, scoring is batch-invariant, and ZeRO-3 on 2 processes works."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, ROOT, assert_ok, read_metrics, run_stage
from rewards.model import RewardModel, RewardScorer, RewardStats, load_reward_model

RM_TINY = FIXTURES / "rm_tiny.yaml"
ZERO3 = str(ROOT / "configs" / "deepspeed" / "zero3.json")
TOPICS = ["the lamp", "a kettle", "my order", "the warranty", "shipping", "a refund", "the color", "a pillow"]


@pytest.fixture(scope="module")
def separable_pairs(tmp_path_factory) -> Path:
    """Chosen answers help politely, rejected ones refuse: a pattern a tiny model separates fully."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"Can you help with {t}?", "chosen": f"Of course, happy to help with {t}!", "rejected": "No."}
            for t in TOPICS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_rm(tmp_path, tiny_model, pairs, *overrides, env=None) -> Path:
    out = tmp_path / "rm"
    result = run_stage("rm", f"model_name_or_path={tiny_model}", f"dataset={pairs}", f"eval_dataset={pairs}",
                       f"output_dir={out}", *overrides, config=RM_TINY, env=env)
    assert_ok(result)
    return out


@pytest.mark.parametrize("mode", [["finetuning_type=full"], ["finetuning_type=lora", "learning_rate=3e-2"],
                                  ["finetuning_type=qlora", "learning_rate=1e-2"],
                                  ["finetuning_type=freeze", "freeze_trainable_layers=1", "learning_rate=2e-2"]],
                         ids=["full", "lora", "qlora", "freeze"])
def test_each_backbone_separates_a_separable_set(tmp_path, tiny_model, separable_pairs, mode):
    out = train_rm(tmp_path, tiny_model, separable_pairs, *mode)
    metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    final = json.loads((out / "trainer_state.json").read_text())
    assert final["eval_accuracy"] == 1.0
    # The scoring API agrees: every chosen response outscores its rejected one, and the stats are saved.
    scorer = RewardScorer(str(out))
    assert scorer.max_length == 96  # rm_tiny.yaml's max_length: a reward model scores as long as it was trained
    rows = [json.loads(line) for line in separable_pairs.read_text().splitlines()]
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected))
    stats = RewardStats.load(out)
    assert stats.count == 2 * len(rows)
    # abs 1e-3: bitsandbytes' CPU 4-bit kernels differ in the 4th digit with the batch shape.
    assert stats.mean == pytest.approx(sum(chosen + rejected) / len(chosen + rejected), abs=1e-3)


def test_full_rm_loads_in_plain_transformers_and_adapter_exports(tmp_path, tiny_model, separable_pairs):
    from transformers import AutoModelForSequenceClassification

    full = train_rm(tmp_path / "full", tiny_model, separable_pairs, "finetuning_type=full", "max_steps=2")
    plain = AutoModelForSequenceClassification.from_pretrained(full, num_labels=1)
    assert plain.config.num_labels == 1 and plain.config.pad_token_id is not None

    adapter = train_rm(tmp_path / "lora", tiny_model, separable_pairs, "finetuning_type=lora", "max_steps=4", "learning_rate=3e-2")
    assert (adapter / "adapter_config.json").exists()
    merged = tmp_path / "merged"
    assert_ok(run_stage("export", "--adapter", str(adapter), "--out", str(merged), config=None))
    exported = AutoModelForSequenceClassification.from_pretrained(merged, num_labels=1)
    assert type(exported).__name__.endswith("ForSequenceClassification")
    prompts, responses = ["Can you help with the lamp?", "Hi"], ["Of course!", "No."]
    from_adapter = RewardScorer(str(adapter)).score(prompts, responses)
    from_export = RewardScorer(str(merged)).score(prompts, responses)
    assert from_export == pytest.approx(from_adapter, abs=1e-5)


def test_batch_scores_equal_one_at_a_time_and_padding_side_does_not_matter(tiny_model):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = RewardModel(AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)).eval()
    scorer = RewardScorer(str(tiny_model), model=model, batch_size=8)
    prompts = ["Hi", "What is the price of the Zephyr lamp?", "Tell me about shipping times to Norway, please."]
    responses = ["Hello.", "The Zephyr lamp costs $25. Happy to help!", "Two weeks."]
    batched = scorer.score(prompts, responses)
    alone = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(b, 4) for b in batched)) == 3
    # Left padding (as PPO rollouts have) gives the same rewards as right padding.
    ids = [scorer.tokenizer("Hello there, friend")["input_ids"], scorer.tokenizer("Hi")["input_ids"]]
    width = max(map(len, ids))
    pad = scorer.tokenizer.pad_token_id
    left = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    right = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    with torch.no_grad():
        assert torch.allclose(model(left, (left != pad).long()), model(right, (right != pad).long()), atol=1e-5)


def test_reward_is_read_at_the_last_real_token_even_when_pad_is_eos(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = RewardModel(AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)).eval()
    eos = model.config.eos_token_id
    ids = torch.tensor([[5, 6, 7, eos], [5, 6, 7, eos]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        scores = model.token_scores(ids, torch.ones_like(ids))
        rewards = model(ids, mask)
    assert rewards[0] == pytest.approx(float(scores[0, 3])) and rewards[1] == pytest.approx(float(scores[1, 2]))


def test_score_command_writes_rewards(tmp_path, tiny_model, separable_pairs):
    out = train_rm(tmp_path, tiny_model, separable_pairs, "finetuning_type=full", "max_steps=2")
    records = tmp_path / "responses.jsonl"
    records.write_text(json.dumps({"prompt": "Hi", "response": "Hello!"}) + "\n" + json.dumps({"prompt": "Hi", "response": "No."}) + "\n")
    scored = tmp_path / "scored.jsonl"
    assert_ok(run_stage("score", "--model", str(out), "--input", str(records), "--output", str(scored), "--normalize", config=None))
    rewards = [json.loads(line)["reward"] for line in scored.read_text().splitlines()]
    stats = RewardStats.load(out)
    raw = RewardScorer(str(out)).score(["Hi", "Hi"], ["Hello!", "No."])
    assert rewards == pytest.approx([(r - stats.mean) / stats.std for r in raw], rel=1e-4)


@pytest.mark.slow
def test_zero3_rm_on_two_processes_matches_one_process(tmp_path, tiny_model, separable_pairs):
    # A gentle learning rate: at 1e-2 the RM's curve amplifies float summation-order differences.
    single = train_rm(tmp_path / "single", tiny_model, separable_pairs, "finetuning_type=full", "max_steps=6", "learning_rate=1e-3")
    sharded = train_rm(tmp_path / "zero3", tiny_model, separable_pairs, "finetuning_type=full", "max_steps=6", "learning_rate=1e-3",
                       f"deepspeed={ZERO3}", "per_device_train_batch_size=2", env={"NPROC": "2", "MASTER_PORT": "29541"})
    single_losses = [m["loss"] for m in read_metrics(single) if "loss" in m]
    sharded_losses = [m["loss"] for m in read_metrics(sharded) if "loss" in m]
    assert sharded_losses == pytest.approx(single_losses, rel=1e-4)
    assert sharded_losses[-1] < sharded_losses[0]
    a, b = load_reward_model(str(single)), load_reward_model(str(sharded))
    ids = torch.tensor([[1, 30, 31, 32]])
    with torch.no_grad():
        assert torch.allclose(a(ids, torch.ones_like(ids)), b(ids, torch.ones_like(ids)), atol=1e-4)
