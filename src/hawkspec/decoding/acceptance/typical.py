"""Medusa's typical acceptance (lossy): accept a candidate whose target probability is not atypically low."""

from __future__ import annotations

import torch

from hawkspec.decoding.acceptance.base import AcceptanceRule, gather1
from hawkspec.decoding.sampling import entropy


class TypicalAcceptance(AcceptanceRule):
    """Accept ``x`` iff ``p(x) > min(epsilon, delta * exp(-H(p)))`` (Medusa's posterior threshold and alpha).

    Rejections leave the target unchanged and the bonus token is sampled from it, so the output distribution
    is *not* the target's: lossy.

    Args:
        epsilon: Hard threshold (Medusa ``posterior_threshold``, 0.09).
        delta: Entropy-scaled threshold (Medusa ``posterior_alpha``, 0.3).
    """

    name = "typical"
    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3):
        self.epsilon, self.delta = epsilon, delta

    def try_candidate(self, r, x, q, u):
        threshold = torch.minimum(torch.full_like(r[:, 0], self.epsilon), self.delta * torch.exp(-entropy(r)))
        return gather1(r, x) > threshold, r

    def describe(self) -> dict:
        return {"name": self.name, "lossless": False, "epsilon": self.epsilon, "delta": self.delta}
