"""Acceptance rules: how a target distribution judges one draft candidate.

The engine walks the candidate tree and, at each node, tries the children in order. For every try it calls
:meth:`AcceptanceRule.try_candidate` with the current *residual* ``r`` (the target at that node, reduced by the
candidates already rejected there), the candidate ``x``, the distribution ``q`` it was drawn from (``None`` for
a deterministically chosen, e.g. top-k, candidate: a point mass) and a uniform draw ``u``. If no child is
accepted the bonus token is drawn from the final residual. All tensors are batched over the M rows tried.
"""

from __future__ import annotations

import abc

import torch

from hawkspec.decoding.sampling import sample


def normalize(r: torch.Tensor) -> torch.Tensor:
    """Rows of ``r`` scaled to sum to one (all-zero rows stay zero)."""
    return r / r.sum(-1, keepdim=True).clamp_min(1e-30)


def gather1(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t: (M, K), x: (M,) -> (M,) the entries t[m, x[m]]."""
    return t.gather(-1, x.unsqueeze(-1)).squeeze(-1)


class AcceptanceRule(abc.ABC):
    """Turns target and draft distributions into accept/reject decisions and residuals.

    Attributes:
        name: The label results and tables give the rule (built from ``_target_``, not looked up by name).
        lossless: True only if the decoder's output distribution provably equals AR sampling's; every result
            row reports it.
        independent: True for rules that judge each candidate on its own against its parent's full target
            (:meth:`accept_independent`; Medusa's typical acceptance): a node is accepted iff its test and every
            ancestor's pass, and the longest accepted root-to-leaf path wins
            (:func:`hawkspec.decoding.walks.walk_longest`). False: children are tried in order against the
            residual and the first accepted one is descended into (recursive rejection sampling).
        longest_row: True for SJD-PAC's released walk (``pac_released``): every node tried against its
            sibling-reduced residual with its own uniform, the longest accepted root-to-leaf row wins
            (:func:`hawkspec.decoding.walks.walk_longest_row`). Lossy.
    """

    name: str = ""
    lossless: bool = False
    independent: bool = False
    longest_row: bool = False
    point_mass_shortcut: bool = False
    """Opt-in: :meth:`draw` stands for trying point-mass children with :meth:`try_candidate` (the exact rule's
    identity, see :meth:`draw`). A subclass that overrides ``try_candidate`` without restating this flag gets
    False, so the engine never bypasses its decisions."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "try_candidate" in cls.__dict__ and "point_mass_shortcut" not in cls.__dict__:
            cls.point_mass_shortcut = False

    def bind(self, backbone) -> None:
        """Precompute what the rule needs from the backbone (embeddings, codebook neighbours)."""

    def target(self, probs: torch.Tensor) -> torch.Tensor:
        """The distribution verification is against, from AR's target probs (..., K)."""
        return probs

    @abc.abstractmethod
    def try_candidate(
        self, r: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Judge candidates.

        Args:
            r: (M, K) current residual target, normalised.
            x: (M,) candidate codes.
            q: (M, K) draft distributions the candidates were sampled from, or None for point masses.
            u: (M,) uniforms in [0, 1).

        Returns:
            accepted (M,) bool, and the residual to use for the next sibling if rejected (M, K), normalised.
        """

    def accept_independent(self, p_parent: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """For ``independent`` rules: whether candidate ``x`` passes against its parent's full target.

        Args:
            p_parent: (..., K) the target at each candidate's parent node.
            x: (...) candidate codes.

        Returns:
            (...) bool.
        """
        raise TypeError(f"acceptance rule {self.name!r} is not independent: it tries children in order")

    def draw(self, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
        """Shortcut for trees of point-mass (top-k) candidates, or None when the rule has none.

        Trying distinct point-mass children x_1..x_m in turn, accepting x_i with r(x_i) and zeroing it on
        rejection, accepts x_i with probability p(x_i) and otherwise ends with a draw from p restricted to
        the rest: exactly one draw ``y ~ p`` at the node, descending into the child equal to y (if any) and
        otherwise keeping y as the bonus token. Rules that can say so set :attr:`point_mass_shortcut` and return
        y for every node: (..., K) -> (...). The engine then walks the tree with a few gathers instead of a loop
        of tries.
        """
        return None

    def bonus(self, r: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The token drawn when no child was accepted: a sample from the residual. (M, K) -> (M,)."""
        return sample(r, generator)

    def describe(self) -> dict:
        return {"name": self.name, "lossless": self.lossless}
