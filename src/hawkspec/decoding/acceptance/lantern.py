"""LANTERN / LANTERN++ (Jang et al. 2024; Park et al. 2025): relaxed acceptance through latent neighbours.

Each code's ``k`` nearest neighbours in the VQ codebook (L2) are precomputed once. For a draft ``x`` the
target mass of the longest prefix of those neighbours (nearest first) whose cumulative mass stays within a
bound is added to ``p(x)``:

* LANTERN: the bound is ``delta`` (default 0.1);
* LANTERN++: the bound is ``(lam − 1) · p(x)``, so ``p̃(x) <= lam · p(x)`` (set ``lam``; ``delta`` is ignored).

The draft is accepted with ``min(1, p̃(x) / q(x))`` (point mass: ``min(1, p̃(x))``). ``delta = 0`` (or
``lam = 1``) accepts exactly as the exact rule; with ``residual: exact`` it is the exact rule, while the official
residual still zeroes the nearest codes after a rejection whose nearest neighbour has zero mass (below). Lossy.

The residual on rejection (``residual``):

* ``neighbours`` (official, jadohu/LANTERN ``evaluate_posterior``; the default of
  ``conf/decoder/acceptance/lantern.yaml``): when a neighbour prefix within the bound exists for the rejected
  draft -- the official condition ``indices != -1``, true even when that prefix adds zero mass (a nearest
  neighbour with ``r = 0``) -- the target is first zeroed at the draft's ``k + 1`` nearest codes (the official
  code zeroes ``nearest_latents[x, :k+1]``, one more than the ``k`` it sums over; the draft itself is not among
  them), then the exact rule's residual is taken (``max(r − q, 0)``, or ``r(x) ← 0`` for a point mass). When
  no prefix fits the bound (the nearest neighbour alone exceeds it) the residual is the exact rule's.
  Fallback: a residual that is zero everywhere after the zeroing (all the target's mass sat on the zeroed
  neighbours and the draft) becomes uniform over the codes, as the official code's ``ones_like`` when its
  residual sums to zero.
* ``exact`` (ours before): the exact rule's residual, ``norm(max(r − q, 0))`` / ``r(x) ← 0``.
"""

from __future__ import annotations

import torch

from hawkspec.decoding.acceptance.base import AcceptanceRule, gather1
from hawkspec.decoding.acceptance.exact import exact_try


RESIDUALS = ("neighbours", "exact")


class LanternAcceptance(AcceptanceRule):
    """Latent-neighbour relaxation.

    Args:
        k: Neighbours per code (the papers: 1000; clamped to the codebook size − 1).
        delta: LANTERN's bound on the added mass.
        lam: LANTERN++'s ratio bound; when set, the rule is LANTERN++.
        residual: ``neighbours`` (official) or ``exact`` (see the module docstring).
    """

    name = "lantern"
    lossless = False

    def __init__(self, k: int = 1000, delta: float = 0.1, lam: float | None = None, residual: str = "neighbours"):
        if residual not in RESIDUALS:
            raise ValueError(f"decoder.acceptance.residual must be one of {RESIDUALS}, got {residual!r}")
        self.residual = residual
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
        ranked = dist.topk(min(k + 1, vecs.shape[0] - 1), dim=-1, largest=False).indices  # nearest first
        self.neighbours = ranked[:, :k]  # (K, k) summed over
        self.zeroed = ranked  # (K, k + 1) zeroed after a rejection with added mass (official)

    def accept_mass(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rx = gather1(r, x)
        return rx + self._extra(r, x, rx)

    def _prefix(self, r, x, rx):
        """The neighbour mass added to r(x) (M,) and whether a neighbour prefix within the bound exists (M,)."""
        bound = self.delta if self.lam is None else (self.lam - 1.0) * rx.unsqueeze(-1)
        mass = r.gather(-1, self.neighbours[x]).cumsum(-1)  # (M, k) cumulative, nearest first
        within = mass <= bound
        # the cumulative mass never decreases, so a prefix within the bound exists iff the nearest one is
        return torch.where(within, mass, torch.zeros_like(mass)).amax(-1), within[..., 0]

    def _extra(self, r, x, rx):
        return self._prefix(r, x, rx)[0]  # the longest prefix within the bound

    def try_candidate(self, r, x, q, u):
        rx = gather1(r, x)
        extra, found = self._prefix(r, x, rx)
        if self.residual == "exact":
            return exact_try(r, x, q, u, rx + extra)
        accepted, plain = exact_try(r, x, q, u, rx + extra)
        # official: zero whenever a neighbour prefix within the bound exists (its `indices != -1`), even one that
        # adds no mass; with none, the exact residual
        added = found.unsqueeze(-1)
        r_zeroed = r.scatter(-1, self.zeroed[x], 0.0)
        rest = r_zeroed.scatter(-1, x.unsqueeze(-1), 0.0) if q is None else (r_zeroed - q).clamp_min(0.0)
        total = rest.sum(-1, keepdim=True)
        rest = torch.where(total > 0, rest / total.clamp_min(1e-30), 1.0 / r.shape[-1])
        return accepted, torch.where(added, rest, plain)

    def describe(self) -> dict:
        out = {"name": "lantern++" if self.lam is not None else self.name, "lossless": False, "k": self.k,
               "residual": self.residual}
        return {**out, **({"lam": self.lam} if self.lam is not None else {"delta": self.delta})}
