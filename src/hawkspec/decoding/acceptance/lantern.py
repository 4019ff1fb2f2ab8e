"""LANTERN / LANTERN++ (Jang et al. 2024; Park et al. 2025): relaxed acceptance through latent neighbours.

Each code's ``k`` nearest neighbours in the VQ codebook (L2) are precomputed once. For a draft ``x`` the
target mass of the longest prefix of those neighbours (nearest first) whose cumulative mass stays within a
bound is added to ``p(x)``:

* LANTERN: the bound is ``delta`` (default 0.1);
* LANTERN++: the bound is ``(lam − 1) · p(x)``, so ``p̃(x) <= lam · p(x)`` (set ``lam``; ``delta`` is ignored).

The draft is accepted with ``min(1, p̃(x) / q(x))`` (point mass: ``min(1, p̃(x))``); the residual on rejection
is the exact rule's. ``delta = 0`` (or ``lam = 1``) is exactly the exact rule. Lossy otherwise.
"""

from __future__ import annotations

import torch

from hawkspec.decoding.acceptance.base import AcceptanceRule, gather1
from hawkspec.decoding.acceptance.exact import exact_try


class LanternAcceptance(AcceptanceRule):
    """Latent-neighbour relaxation.

    Args:
        k: Neighbours per code (the papers: 1000; clamped to the codebook size − 1).
        delta: LANTERN's bound on the added mass.
        lam: LANTERN++'s ratio bound; when set, the rule is LANTERN++.
    """

    name = "lantern"
    lossless = False

    def __init__(self, k: int = 1000, delta: float = 0.1, lam: float | None = None):
        if k < 1:
            raise ValueError(f"decoder.acceptance.k must be >= 1, got {k}")
        if delta < 0:
            raise ValueError(f"decoder.acceptance.delta must be >= 0, got {delta}")
        if lam is not None and lam < 1:
            raise ValueError(f"decoder.acceptance.lam must be >= 1 (LANTERN++), got {lam}")
        self.k, self.delta, self.lam = int(k), float(delta), lam
        self.neighbours = None

    def bind(self, backbone) -> None:
        vecs = backbone.codebook_vectors().float()
        k = min(self.k, vecs.shape[0] - 1)
        dist = torch.cdist(vecs, vecs)
        dist.fill_diagonal_(float("inf"))
        self.neighbours = dist.topk(k, dim=-1, largest=False).indices  # (K, k), nearest first

    def accept_mass(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rx = gather1(r, x)
        bound = self.delta if self.lam is None else (self.lam - 1.0) * rx.unsqueeze(-1)
        mass = r.gather(-1, self.neighbours[x]).cumsum(-1)  # (M, k) cumulative, nearest first
        extra = torch.where(mass <= bound, mass, torch.zeros_like(mass)).amax(-1)  # longest prefix within bound
        return rx + extra

    def try_candidate(self, r, x, q, u):
        return exact_try(r, x, q, u, self.accept_mass(r, x))

    def describe(self) -> dict:
        out = {"name": "lantern++" if self.lam is not None else self.name, "lossless": False, "k": self.k}
        return {**out, **({"lam": self.lam} if self.lam is not None else {"delta": self.delta})}
