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
