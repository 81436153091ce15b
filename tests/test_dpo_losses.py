"""DPO's losses (stages/dpo/losses.py) against a naive float64 loop, at initialization, and against TRL DPOTrainer's
own loss and metric computation on the same log-probs."""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from stages.dpo.losses import LOSSES, chosen_nll, dpo_loss, pair_metrics

PAIRS, LENGTH = 6, 9


def log_probs(seed: int):
    """Summed response log-probs of policy and reference, and each response's length."""
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(PAIRS, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]
    lengths = [torch.randint(1, LENGTH + 1, (PAIRS,), generator=g).double() for _ in range(2)]
    return logps, lengths


def naive(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, eps, len_c, len_r, ties=None):
    """Per pair, with the label p = 1 (chosen preferred) or ½ (a tie): the loss as the papers write it for a label p."""
    out = []
    for i in range(PAIRS):
        p = 0.5 if ties and ties[i] else 1.0
        rc, rr = chosen[i] - ref_chosen[i], rejected[i] - ref_rejected[i]
        d = beta * (rc - rr)
        if loss_type == "sigmoid":
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
            q = 0.5 if p == 0.5 else 1 - eps
            out.append(-q * math.log(sig(d)) - (1 - q) * math.log(sig(-d)))
        elif loss_type == "hinge":
            out.append(p * max(0.0, 1 - d) + (1 - p) * max(0.0, 1 + d))
        else:
            out.append((rc / len_c[i] - rr / len_r[i] - (2 * p - 1) / (2 * beta)) ** 2)
    return out


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_loss_equals_a_naive_loop(loss_type, eps, beta):
    (c, r, rc, rr), (lc, lr) = log_probs(1)
    got = dpo_loss(c, r, rc, rr, beta, loss_type, eps, lc, lr)
    want = naive(c.tolist(), r.tolist(), rc.tolist(), rr.tolist(), beta, loss_type, eps, lc.tolist(), lr.tolist())
    assert got.tolist() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_a_tie_has_the_label_one_half_and_its_loss_is_smallest_at_zero_margin(loss_type, eps):
    (c, r, rc, rr), (lc, lr) = log_probs(2)
    ties = torch.tensor([True, False, True, False, False, True])
    got = dpo_loss(c, r, rc, rr, 0.3, loss_type, eps, lc, lr, ties)
    want = naive(c.tolist(), r.tolist(), rc.tolist(), rr.tolist(), 0.3, loss_type, eps, lc.tolist(), lr.tolist(), ties.tolist())
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    # a tie's loss is symmetric in the two responses, so its minimum over the margin is at zero
    margins = torch.linspace(-3, 3, 61, dtype=torch.float64)
    zeros, ones = torch.zeros(61, dtype=torch.float64), torch.ones(61, dtype=torch.float64)
    curve = dpo_loss(margins, zeros, zeros, zeros, 1.0, loss_type, eps, ones, ones, torch.ones(61, dtype=torch.bool))
    assert curve.argmin().item() == 30 or (loss_type == "hinge" and curve[30] == curve.min())


def test_at_initialization_the_sigmoid_loss_is_log_2_and_every_margin_0():
    (c, r, _, _), _ = log_probs(2)
    assert dpo_loss(c, r, c.clone(), r.clone(), 0.1).tolist() == pytest.approx([math.log(2)] * PAIRS)
    metrics = pair_metrics(c, r, c.clone(), r.clone(), 0.1)
    assert metrics["rewards/margins"] == 0 and metrics["rewards/chosen"] == 0 and metrics["rewards/accuracies"] == 0


def test_the_chosen_nll_is_the_mean_over_masked_tokens():
    token_logps = -torch.rand(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float64)
    picked = [-float(token_logps[i, j]) for i in range(3) for j in range(5) if mask[i, j]]
    assert float(chosen_nll(token_logps, mask)) == pytest.approx(sum(picked) / len(picked))


def test_an_unknown_loss_and_ipo_without_lengths_are_refused():
    (c, r, rc, rr), _ = log_probs(3)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(c, r, rc, rr, 0.1, "kto")
    with pytest.raises(ValueError, match="ipo averages"):
        dpo_loss(c, r, rc, rr, 0.1, "ipo")


def trl_loss_and_metrics(token_logps, mask, ref_chosen, ref_rejected, beta: float, loss_types: list[str], weights: list[float]):
    """TRL DPOTrainer._compute_loss on these per-token log-probs: a stand-in model returns them as its fused LM head
    would (zero outside the completions), and the trainer's state holds only what that method reads."""
    from trl import DPOTrainer

    rows, width = token_logps.shape
    outputs = SimpleNamespace(log_probs=token_logps * mask, entropy=torch.zeros(rows, width), mean_logits=torch.zeros(rows, width),
                              is_top1=torch.zeros(rows, width, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
                              f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights, beta=beta,
                              label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                              _total_train_tokens=0, _tp_size=1)
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)  # input positions
    inputs = {"input_ids": torch.ones(rows, width + 1, dtype=torch.long), "attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", LOSSES)
def test_loss_rewards_and_accuracies_equal_trl_dpo_trainers(loss_type):
    g = torch.Generator().manual_seed(4)
    token_logps = -torch.rand(2 * PAIRS, LENGTH, generator=g) * 3
    mask = (torch.rand(2 * PAIRS, LENGTH, generator=g) < 0.7).float()
    mask[:, 0] = 1.0  # every response has a token
    ref_chosen, ref_rejected = -torch.rand(PAIRS, generator=g) * 20, -torch.rand(PAIRS, generator=g) * 20
    beta = 0.3
    trl, trl_metrics = trl_loss_and_metrics(token_logps, mask, ref_chosen, ref_rejected, beta, [loss_type], [1.0])

    logps, lengths = (token_logps * mask).sum(1), mask.sum(1)
    ours = dpo_loss(logps[:PAIRS], logps[PAIRS:], ref_chosen, ref_rejected, beta, loss_type, 0.0, lengths[:PAIRS], lengths[PAIRS:])
    assert float(ours.mean()) == pytest.approx(trl, rel=1e-5)
    metrics = pair_metrics(logps[:PAIRS], logps[PAIRS:], ref_chosen, ref_rejected, beta)
    for key, value in metrics.items():
        assert value == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_the_rpo_sft_term_equals_trls_sft_loss():
    g = torch.Generator().manual_seed(5)
    token_logps = -torch.rand(2 * PAIRS, LENGTH, generator=g) * 3
    mask = torch.ones(2 * PAIRS, LENGTH)
    mask[:, 6:] = 0
    ref = -torch.rand(PAIRS, generator=g) * 20
    alpha = 0.5
    trl, _ = trl_loss_and_metrics(token_logps, mask, ref, ref - 1, 0.1, ["sigmoid", "sft"], [1.0, alpha])
    logps = (token_logps * mask).sum(1)
    ours = dpo_loss(logps[:PAIRS], logps[PAIRS:], ref, ref - 1, 0.1).mean() + alpha * chosen_nll(token_logps[:PAIRS], mask[:PAIRS])
    assert float(ours) == pytest.approx(trl, rel=1e-5)
