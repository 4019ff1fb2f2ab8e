"""The one sampler every decoder draws from (AR included): exact, seeded, never a zero-probability code."""

import torch
from scipy.stats import chisquare

from hawkspec.decoding import sampling
from hawkspec.decoding.sampling import sample


def test_sample_follows_each_rows_distribution_and_skips_zeros():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([
        [0.0, 0.5, 0.0, 0.2, 0.3, 0.0],  # zeros first, between and last
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
        [0.0, 0.0, 0.0, 0.0, 2.0, 0.0],  # unnormalised point mass
    ])
    draws = sample(probs.unsqueeze(0).expand(20_000, -1, -1), g)  # (S, 3)
    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=6).double()
        p = probs[row] / probs[row].sum()
        assert counts[p == 0].sum() == 0
        keep = p > 0
        if keep.sum() > 1:
            assert chisquare(counts[keep].numpy(), (p[keep] * 20_000).double().numpy()).pvalue > 1e-3
    assert torch.equal(sample(probs, torch.Generator().manual_seed(5)), sample(probs, torch.Generator().manual_seed(5)))


def test_a_uniform_that_rounds_up_to_the_total_still_draws_a_code_with_mass(monkeypatch):
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0]])
    monkeypatch.setattr(sampling.torch, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype")))
    assert sample(probs).item() == 2
