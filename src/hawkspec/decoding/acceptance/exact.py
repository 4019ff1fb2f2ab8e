"""Exact speculative sampling with multi-draft recursive residuals (lossless), and its greedy limit."""

from __future__ import annotations

import torch

from hawkspec.decoding.acceptance.base import AcceptanceRule, gather1, normalize
from hawkspec.decoding.sampling import one_hot, sample


def exact_try(
    r: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None, u: torch.Tensor, accept_mass: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rule, shared by the relaxed rules (which pass a larger ``accept_mass``).

    Sampled candidate (x ~ q): accept with ``min(1, r(x) / q(x))``; on rejection ``r <- norm(max(r - q, 0))``.
    Point-mass candidate (q None): accept with ``r(x)``; on rejection ``r(x) <- 0`` and renormalise.

    Args:
        accept_mass: (M,) what stands for r(x) in the acceptance test (default r(x) itself).
    """
    rx = gather1(r, x) if accept_mass is None else accept_mass
    if q is None:
        accepted = u < rx
        rejected = r.scatter(-1, x.unsqueeze(-1), 0.0)
    else:
        accepted = u * gather1(q, x) < rx
        rejected = (r - q).clamp_min(0.0)
    rejected = normalize(rejected)
    # r == q leaves nothing: then acceptance was certain and the residual is never used; keep r for safety
    empty = rejected.sum(-1, keepdim=True) == 0
    return accepted, torch.where(empty, r, rejected)


class ExactAcceptance(AcceptanceRule):
    """Lossless: the committed tokens follow exactly the AR target distribution (BRIEF §2, Hawk App. A)."""

    name = "exact"
    lossless = True
    point_mass_shortcut = True  # draw() is exactly what try_candidate does to point-mass children

    def try_candidate(self, r, x, q, u):
        return exact_try(r, x, q, u)

    def draw(self, p, generator):
        return sample(p, generator)


class GreedyAcceptance(ExactAcceptance):
    """Deterministic verification: the target is the argmax of AR's target, so a candidate is accepted iff it
    equals that argmax, and the bonus is the argmax. Equals greedy AR token for token; lossless at T = 0."""

    name = "greedy"
    lossless = True

    def target(self, probs: torch.Tensor) -> torch.Tensor:
        return one_hot(probs.argmax(-1), probs.shape[-1], probs.dtype)

    def bonus(self, r, generator):
        return r.argmax(-1)

    def draw(self, p, generator):
        return p.argmax(-1)

    def describe(self) -> dict:
        return {"name": self.name, "lossless": self.lossless, "note": "lossless w.r.t. greedy AR"}
