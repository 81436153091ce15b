"""The reward-model losses against naive scalar references."""
import math

import torch

from stages.rm.losses import bradley_terry_loss, centering_penalty


def test_bradley_terry_matches_the_formula():
    chosen, rejected, margin = torch.tensor([2.0, -1.0, 0.3, 40.0]), torch.tensor([1.0, 0.5, 0.3, -40.0]), torch.tensor([0.0, 1.0, 0.5, 0.0])
    expected = [-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())]
    assert torch.allclose(bradley_terry_loss(chosen, rejected, margin), torch.tensor(expected), atol=1e-6)
    assert bradley_terry_loss(torch.tensor([-50.0]), torch.tensor([50.0])).isfinite().all()  # stable far from 0


def test_centering_penalty():
    assert torch.equal(centering_penalty(torch.tensor([1.0, -2.0]), torch.tensor([1.0, 2.0])), torch.tensor([4.0, 0.0]))


def test_a_tie_pair_is_the_likelihood_of_p_one_half():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.3, 3.0]), torch.tensor([1.0, 0.5, 0.3, -3.0])
    margin, tie = torch.tensor([0.0, 1.0, 0.5, 0.0]), torch.tensor([True, False, True, True])

    def naive(c, r, m, t):
        sigmoid = 1 / (1 + math.exp(-(c - r)))
        return -(0.5 * math.log(sigmoid) + 0.5 * math.log(1 - sigmoid)) if t else -math.log(1 / (1 + math.exp(-(c - r - m))))

    expected = [naive(*row) for row in zip(chosen.tolist(), rejected.tolist(), margin.tolist(), tie.tolist())]
    loss = bradley_terry_loss(chosen, rejected, margin, tie)
    assert torch.allclose(loss, torch.tensor(expected), atol=1e-6)
    assert loss[2] == min(naive(x, 0.3, 0.0, True) for x in (0.3, 0.0, 0.6, -1.0))  # a tie is best when the rewards are equal
    # the gradient pulls a tie pair's rewards together, from either side
    gap = torch.tensor([1.5, -1.5], requires_grad=True)
    bradley_terry_loss(gap, torch.zeros(2), 0.0, torch.tensor([True, True])).sum().backward()
    assert gap.grad[0] > 0 and gap.grad[1] < 0
