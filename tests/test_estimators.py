"""The critic-free estimators, k2, and the loss aggregations: each pure function against a naive loop, and rloo
against TRL's RLOOTrainer computing advantages on the same rewards."""
from __future__ import annotations

import random
import statistics

import pytest
import torch

from stages.ppo.advantages import discounted_returns, group_baseline, group_stats
from stages.ppo.kl import kl_estimate
from stages.ppo.losses import aggregate, kl_loss


def naive_baseline(scores: list[float], n: int, estimator: str, scale_by_std: bool = True, eps: float = 1e-6) -> list[float]:
    out = []
    for start in range(0, len(scores), n):
        group = scores[start : start + n]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            if estimator == "rloo":
                out.append(r - sum(others) / len(others))
            elif estimator == "reinforce_pp_baseline":
                out.append(r - sum(group) / n)
            elif estimator == "grpo":
                centered = r - sum(group) / n
                out.append(centered / (statistics.stdev(group) + eps) if scale_by_std else centered)
            else:
                out.append(r)
    return out


@pytest.mark.parametrize("estimator,scale", [("grpo", True), ("grpo", False), ("rloo", True), ("reinforce_pp_baseline", True),
                                             ("reinforce_pp", True), ("gae", True)])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_group_baselines_equal_a_naive_loop(estimator, scale, n):
    rng = random.Random(n)
    scores = [rng.choice([0.0, 1.0, rng.gauss(0, 2)]) for _ in range(4 * n)]
    got = group_baseline(torch.tensor(scores, dtype=torch.float64), n, estimator, scale)
    assert got.tolist() == pytest.approx(naive_baseline(scores, n, estimator, scale), abs=1e-9)
    if estimator in ("grpo", "rloo", "reinforce_pp_baseline"):  # a group baseline: every group sums to 0
        assert got.view(-1, n).sum(dim=1).abs().max() < 1e-9


def test_a_group_of_equal_scores_gets_no_advantage():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 2.0])
    for estimator in ("grpo", "rloo", "reinforce_pp_baseline"):
        assert group_baseline(scores, 4, estimator)[:4].abs().max() == 0
    stats = group_stats(scores, 4)
    assert stats["zero_variance_groups"] == 0.5 and stats["group_reward_mean"] == 1.0
    assert stats["group_reward_std"] == pytest.approx(statistics.stdev([0, 2, 0, 2]) / 2)


def test_discounted_returns_equal_a_naive_loop():
    torch.manual_seed(0)
    rewards, mask = torch.randn(4, 7, dtype=torch.float64), torch.ones(4, 7)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    for gamma in (1.0, 0.9):
        got = discounted_returns(rewards, mask, gamma)
        for b in range(4):
            for t in range(7):
                want = sum(gamma ** (k - t) * float(rewards[b, k]) for k in range(t, 7) if mask[b, k]) if mask[b, t] else 0.0
                assert float(got[b, t]) == pytest.approx(want, abs=1e-9)


def test_k2_and_the_kl_loss():
    logprobs, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert kl_estimate(logprobs, ref, "k2")[0].tolist() == pytest.approx([0.125, 0.5, 0.0])
    assert float(kl_loss(logprobs, ref, mask, "k2")) == pytest.approx((0.125 + 0.5) / 2)
    assert float(kl_loss(logprobs, ref, mask, "k1", "seq_mean_token_sum")) == pytest.approx(0.5 - 1.0)


def test_loss_aggregations_equal_a_naive_loop():
    torch.manual_seed(1)
    values, mask = torch.randn(3, 6, dtype=torch.float64), torch.ones(3, 6)
    mask[0, 2:] = 0
    mask[2, 5:] = 0
    rows = [[float(values[b, t]) for t in range(6) if mask[b, t]] for b in range(3)]
    tokens = [v for row in rows for v in row]
    assert float(aggregate(values, mask, "token_mean")) == pytest.approx(sum(tokens) / len(tokens))
    assert float(aggregate(values, mask, "seq_mean_token_sum")) == pytest.approx(sum(sum(r) for r in rows) / 3)
    assert float(aggregate(values, mask, "seq_mean_token_mean")) == pytest.approx(sum(sum(r) / len(r) for r in rows) / 3)


def test_rloo_equals_trl_rloo_trainer_on_the_same_rewards(tiny_model, tmp_path):
    """TRL's RLOOTrainer samples and scores one generation batch on the tiny model (beta 0, no advantage normalisation);
    our rloo baseline of the rewards it saw equals the advantages it computed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "left"
    rng, seen = random.Random(0), []

    def reward(completions, **_):
        values = [rng.choice([0.0, 1.0, 2.0, 3.5, rng.gauss(0, 1)]) for _ in completions]
        seen.extend(values)
        return values

    n = 4
    config = RLOOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=n, max_completion_length=4,
                        beta=0.0, normalize_advantages=False, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0)
    trainer = RLOOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_list([{"prompt": f"question {i}"} for i in range(8)]), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert [row["prompt"] for row in batch[:n]] == [batch[0]["prompt"]] * n  # TRL's groups: n next to each other, as ours
    trl_advantages = trainer._generate_and_score_completions(batch)["advantages"]
    ours = group_baseline(torch.tensor(seen), n, "rloo")
    assert len(seen) == len(trl_advantages) == 8
    assert torch.allclose(ours, trl_advantages.float(), atol=1e-6), (ours, trl_advantages)
