"""Every PPO formula against a naive scalar reference (plain Python loops over floats)."""
from __future__ import annotations

import math

import pytest
import torch

from stages.ppo.advantages import explained_variance, gae, masked_whiten, per_token_rewards
from stages.ppo.kl import AdaptiveKLController, FixedKLController, kl_estimate
from stages.ppo.losses import policy_loss, truncated_is_weights, value_loss

torch.manual_seed(0)
B, T = 3, 6
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float32)


def cells(mask=MASK):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def test_kl_estimators():
    logp, ref = torch.randn(B, T), torch.randn(B, T)
    for b, t in cells():
        p, q = float(logp[b, t]), float(ref[b, t])
        assert float(kl_estimate(logp, ref, "k1")[b, t]) == pytest.approx(p - q, abs=1e-6)
        r = math.exp(q - p)
        assert float(kl_estimate(logp, ref, "k3")[b, t]) == pytest.approx((r - 1) - math.log(r), rel=1e-5, abs=1e-6)
        assert float(kl_estimate(logp, ref, "k2")[b, t]) == pytest.approx(0.5 * math.log(r) ** 2, rel=1e-5, abs=1e-6)
    assert (kl_estimate(logp, ref, "k3") >= 0).all() and (kl_estimate(logp, ref, "k2") >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_adaptive_kl_controller_follows_ziegler():
    controller, beta = AdaptiveKLController(0.1, target=6.0, horizon=10000), 0.1
    for kl, n in [(12.0, 256), (6.6, 256), (1.0, 512), (6.0, 64)]:
        error = min(max(kl / 6.0 - 1, -0.2), 0.2)
        beta *= 1 + error * n / 10000
        controller.update(kl, n)
        assert controller.beta == pytest.approx(beta, rel=1e-12)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.beta == 0.05


def test_per_token_rewards_put_the_score_on_the_last_response_token():
    kl, scores = torch.rand(B, T), torch.tensor([1.0, -2.0, 0.5])
    rewards = per_token_rewards(scores, kl, MASK, beta=0.1)
    last = {0: 5, 1: 2, 2: 4}
    for b in range(B):
        for t in range(T):
            expected = (-0.1 * float(kl[b, t]) if MASK[b, t] else 0.0) + (float(scores[b]) if t == last[b] else 0.0)
            assert float(rewards[b, t]) == pytest.approx(expected, abs=1e-6)


def test_gae_matches_the_recursion():
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    gamma, lam = 0.99, 0.95
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    for b in range(B):
        length = int(MASK[b].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            assert float(advantages[b, t]) == pytest.approx(running, abs=1e-5)
            assert float(returns[b, t]) == pytest.approx(running + float(values[b, t]), abs=1e-5)
        assert advantages[b, length:].abs().sum() == 0


def test_whitening_over_the_mask():
    values = torch.randn(B, T) * 3 + 2
    picked = [float(values[b, t]) for b, t in cells()]
    mean = sum(picked) / len(picked)
    std = math.sqrt(sum((x - mean) ** 2 for x in picked) / (len(picked) - 1))
    whitened, kept_mean = masked_whiten(values, MASK), masked_whiten(values, MASK, shift_mean=False)
    for b, t in cells():
        assert float(whitened[b, t]) == pytest.approx((float(values[b, t]) - mean) / std, abs=1e-4)
        assert float(kept_mean[b, t]) == pytest.approx((float(values[b, t]) - mean) / std + mean, abs=1e-4)
    assert whitened[1, 3:].abs().sum() == 0


def test_policy_loss_clipping_and_diagnostics():
    logp, old, adv = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3, torch.randn(B, T)
    loss, stats = policy_loss(logp, old, adv, MASK, clip_range=0.2)
    terms, clipped, approx = [], 0, []
    for b, t in cells():
        ratio = math.exp(float(logp[b, t]) - float(old[b, t]))
        a = float(adv[b, t])
        unclipped_term, clipped_term = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
        terms.append(max(unclipped_term, clipped_term))
        clipped += clipped_term > unclipped_term
        approx.append(0.5 * (float(logp[b, t]) - float(old[b, t])) ** 2)
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert stats["clipfrac"] == pytest.approx(clipped / len(terms), abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(sum(approx) / len(approx), abs=1e-6)
    assert 0 < stats["clipfrac"] < 1


def test_truncated_importance_weights_scale_each_tokens_surrogate():
    logp, old, engine, adv = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.5, torch.randn(B, T)
    cap = 1.5
    weights = truncated_is_weights(old, engine, cap)
    loss, _ = policy_loss(logp, old, adv, MASK, clip_range=0.2, weights=weights)
    terms, capped = [], 0
    for b, t in cells():
        w = min(math.exp(float(old[b, t]) - float(engine[b, t])), cap)
        capped += w == cap
        assert float(weights[b, t]) == pytest.approx(w, rel=1e-5)
        ratio, a = math.exp(float(logp[b, t]) - float(old[b, t])), float(adv[b, t])
        terms.append(w * max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
    assert 0 < capped < len(terms)  # the cap binds on some tokens, not all
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert not weights.requires_grad


def test_value_loss_clipped_and_unclipped():
    values, old, returns = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    loss, stats = value_loss(values, old, returns, MASK, clip_range_value=0.2)
    plain, _ = value_loss(values, old, returns, MASK, clip_range_value=None)
    terms, plain_terms = [], []
    for b, t in cells():
        v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
        v_clip = o + min(max(v - o, -0.2), 0.2)
        terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
        plain_terms.append((v - r) ** 2)
    assert float(loss) == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-5)
    assert float(plain) == pytest.approx(0.5 * sum(plain_terms) / len(plain_terms), abs=1e-5)
    assert stats["vf_clipfrac"] > 0


def test_explained_variance():
    returns = torch.randn(B, T)
    assert explained_variance(returns, returns, MASK) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(B, T) + float((returns * MASK).sum() / MASK.sum()), returns, MASK) == pytest.approx(0.0, abs=1e-5)


def test_whitening_over_processes_equals_whitening_the_whole_batch():
    """masked_whiten with a sum over processes: each half, whitened with both halves' statistics, is the whole batch
    whitened (what 2 processes must give for PPO's results not to depend on the process count)."""
    from stages.ppo.advantages import masked_whiten

    torch.manual_seed(0)
    values, mask = torch.randn(6, 5, dtype=torch.float64), (torch.rand(6, 5) > 0.3).double()
    whole = masked_whiten(values, mask)
    halves = [(values[:3], mask[:3]), (values[3:], mask[3:])]

    def stats(v, m):
        return [float((v * m).sum()), float((v**2 * m).sum()), float(m.sum())]

    both = [a + b for a, b in zip(stats(*halves[0]), stats(*halves[1]))]
    parts = [masked_whiten(v, m, reduce=lambda _local: both) for v, m in halves]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-8)
    assert not torch.allclose(torch.cat([masked_whiten(v, m) for v, m in halves]), whole, atol=1e-3)  # per-process is not
