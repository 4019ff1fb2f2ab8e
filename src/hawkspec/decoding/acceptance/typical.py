"""Medusa's typical acceptance (lossy): accept a candidate whose target probability is not atypically low.

Official semantics (FasterDecoding/Medusa ``evaluate_posterior`` with ``sampling='typical'`` and
``medusa_generate``'s default ``fast=True``), the defaults here:

* every candidate is judged **on its own** against the full target at its parent,
  ``p(x) > min(epsilon, delta · exp(−H(p)))``, with ``H(p) = −Σ p log(p + 1e-5)`` as in Medusa;
* the **longest** root-to-leaf path whose candidates all pass is kept (ties: the most likely path), not the
  path through the first accepted child (:func:`hawkspec.decoding.walks.walk_longest`);
* the next token (our bonus) is the **argmax** of the target at the last accepted node (``bonus: argmax``,
  Medusa's ``fast=True``); ``bonus: typical`` samples it from the target restricted to tokens with
  ``p >= threshold`` (Medusa's ``fast=False`` ``get_typical_one_token``); ``bonus: sample`` samples it from
  the full target (ours before the official semantics became the default).

``walk: first`` keeps our earlier walk (try the children in order, descend into the first accepted one) as a
named option. Rejections never change the target, so the output distribution is not AR's: lossy.
"""

from __future__ import annotations

import torch

from hawkspec.decoding.acceptance.base import AcceptanceRule, gather1
from hawkspec.decoding.sampling import sample

BONUSES = ("argmax", "typical", "sample")
WALKS = ("longest", "first")


class TypicalAcceptance(AcceptanceRule):
    """Accept ``x`` iff ``p(x) > min(epsilon, delta * exp(-H(p)))`` (Medusa's posterior threshold and alpha).

    Args:
        epsilon: Hard threshold (Medusa ``posterior_threshold``, 0.09).
        delta: Entropy-scaled threshold (Medusa ``posterior_alpha``, 0.3).
        walk: ``longest`` (official: each candidate judged on its own, the longest accepted path wins) or
            ``first`` (descend into the first accepted child).
        bonus: How the token after the accepted path is chosen: ``argmax`` (official, ``fast=True``),
            ``typical`` (official ``fast=False``) or ``sample`` (from the full target).
    """

    name = "typical"
    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3, walk: str = "longest", bonus: str = "argmax"):
        if walk not in WALKS:
            raise ValueError(f"decoder.acceptance.walk must be one of {WALKS}, got {walk!r}")
        if bonus not in BONUSES:
            raise ValueError(f"decoder.acceptance.bonus must be one of {BONUSES}, got {bonus!r}")
        self.epsilon, self.delta, self.walk, self.bonus_mode = epsilon, delta, walk, bonus
        self.independent = walk == "longest"

    def threshold(self, p: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (...) Medusa's ``min(posterior_threshold, posterior_alpha * exp(-H))``."""
        ent = -(p * torch.log(p + 1e-5)).sum(-1)
        return torch.clamp(self.delta * torch.exp(-ent), max=self.epsilon)

    def accept_independent(self, p_parent, x):
        return p_parent.gather(-1, x.unsqueeze(-1)).squeeze(-1) > self.threshold(p_parent)

    def try_candidate(self, r, x, q, u):
        return gather1(r, x) > self.threshold(r), r

    def bonus(self, r, generator):
        if self.bonus_mode == "argmax":
            return r.argmax(-1)
        if self.bonus_mode == "typical":
            kept = torch.where(r >= self.threshold(r).unsqueeze(-1), r, 0.0)
            kept = torch.where(kept.sum(-1, keepdim=True) > 0, kept, r)  # nothing typical: the target itself
            return sample(kept / kept.sum(-1, keepdim=True), generator)
        return sample(r, generator)

    def describe(self) -> dict:
        return {"name": self.name, "lossless": False, "epsilon": self.epsilon, "delta": self.delta,
                "walk": self.walk, "bonus": self.bonus_mode}
