"""Hawk: horizontal heads plus vertical heads whose drafts wait in a speculation cache until their row comes.

Every accepted token's hidden state runs through the vertical heads; head d's draft for the token d rows
below (body position ``s + d*W``) is stored in the *speculation cache*, keyed by that target position. When
decoding speculates position p, the fresh horizontal draft for p and the cached vertical drafts for p are
merged into one *spatial sampling pool* (in the configured verification order), and the tree draws its
candidates from the pool.

:class:`HawkProposer` is a :class:`~hawkspec.decoding.proposers.spatial.SpatialProposer` whose sources follow
from Hawk's flags (the keys sweeps override: ``decoder.proposer.vsd``, ``vertical``, ``order``, ...):
a :class:`~hawkspec.decoding.proposers.sources.HorizontalSource`, a
:class:`~hawkspec.decoding.proposers.sources.VerticalSource` (the cache) and, with ``jacobi``, a
:class:`~hawkspec.decoding.proposers.sources.JacobiSource`. The same proposer written as sources
(``hawk_jacobi`` here; the ``hawk_eagle`` preset mixes in the EAGLE draft model the same way)::

    _target_: hawkspec.decoding.proposers.SpatialProposer
    name: hawk
    sources:
      horizontal: {_target_: hawkspec.decoding.proposers.sources.HorizontalSource, path: ${....heads_path}}
      vertical: {_target_: hawkspec.decoding.proposers.sources.VerticalSource, path: ${....heads_path}}
      jacobi: {_target_: hawkspec.decoding.proposers.sources.JacobiSource}
    order: [jacobi, vertical, horizontal]
    priority: [vertical, horizontal]
"""

from __future__ import annotations

from hawkspec.decoding.proposers.sources import DRAFTS, HorizontalSource, JacobiSource, VerticalSource
from hawkspec.decoding.proposers.spatial import SpatialProposer
from hawkspec.heads.draft import DraftHeads

ORDERS = ("vertical_first", "horizontal_first", "interleave")
JACOBI = ("none", "fill", "first")


class HawkProposer(SpatialProposer):
    """Medusa's horizontal drafts merged with cached vertical drafts.

    Args:
        heads: Draft heads with vertical heads (``heads.vertical=true``); ``build_decoder`` loads them from
            ``decoder.heads_path``.
        draft: ``topk`` or ``sample`` (see :class:`~hawkspec.decoding.proposers.MedusaProposer`).
        vertical: Use the vertical heads (False = Medusa with Hawk's plumbing, for ablations).
        horizontal: Use the horizontal heads (False = drafts from the speculation cache only, the paper's
            "vertical-only" ablation).
        vsd: Vertical speculation depth used at decoding, <= the heads' vsd (None: all of them).
        vertical_candidates: Candidates each vertical head contributes per position (m).
        order: Verification order of the pool: ``vertical_first`` (the paper's), ``horizontal_first`` or
            ``interleave``. Pool membership is the same for every order with top-k drafts (all cached
            vertical candidates, then the best horizontal ones until the pool is full); with sampled drafts
            the pool takes them in this order.
        jacobi: Also take the drafts Jacobi iteration gets for free from the last verification forward (each
            uncommitted position the tree predicted, drawn from that node's output, see
            :class:`~hawkspec.decoding.proposers.jacobi.JacobiDrafts`): ``none`` (the paper's Hawk), ``fill``
            (into the first pool slot the heads leave empty: positions past the horizontal heads' reach that
            no vertical draft covers) or ``first`` (ahead of the heads' drafts; the heads then draft the
            positions Jacobi has not reached, where SJD starts from random codes). Ours, not the paper's.
            Exact with the exact rule: each draft keeps the distribution it was drawn from.
    """

    name = "hawk"

    def __init__(
        self, heads: DraftHeads, draft: str = "topk", vertical: bool = True, vsd: int | None = None,
        vertical_candidates: int = 1, order: str = "vertical_first", horizontal: bool = True, jacobi: str = "none",
    ):
        if draft not in DRAFTS:
            raise ValueError(f"decoder.proposer.draft must be 'topk' or 'sample', got {draft!r}")
        if jacobi not in JACOBI:
            raise ValueError(f"decoder.proposer.jacobi must be one of {JACOBI}, got {jacobi!r}")
        if not (vertical or horizontal):
            raise ValueError("decoder.proposer: vertical=false and horizontal=false leave no drafts; enable one")
        if order not in ORDERS:
            raise ValueError(f"decoder.proposer.order must be one of {ORDERS}, got {order!r}")
        have = heads.config.num_vertical
        if vertical and not have:
            raise ValueError("decoder.proposer.vertical=true needs heads trained with vertical heads (heads=hawk)")
        self.vsd = (vsd or have) if vertical else 0
        if self.vsd > have:
            raise ValueError(f"decoder.proposer.vsd={self.vsd} exceeds the heads' vertical depth {have}")
        if vertical_candidates < 1:
            raise ValueError(f"decoder.proposer.vertical_candidates must be >= 1, got {vertical_candidates}")
        if order == "interleave" and draft == "sample" and self.vsd:
            raise ValueError("decoder.proposer.order=interleave is only supported with draft=topk")
        key = "decoder.heads_path"
        sources = {}
        if horizontal:
            sources["horizontal"] = HorizontalSource(heads, draft=draft, key=key)
        if self.vsd:
            sources["vertical"] = VerticalSource(heads, draft=draft, vsd=self.vsd, candidates=vertical_candidates,
                                                 key=key)
        if jacobi != "none":
            sources["jacobi"] = JacobiSource()
        heads_order = {"vertical_first": ["vertical", "horizontal"], "horizontal_first": ["horizontal", "vertical"],
                       "interleave": ["vertical", "horizontal"]}[order]
        heads_order = [n for n in heads_order if n in sources]
        groups = [heads_order] if order == "interleave" and len(heads_order) > 1 else heads_order
        # top-k pools: every cached vertical candidate, then the best horizontal ones (same members for every
        # order); sampled pools take the drafts in verification order. Jacobi drafts never compete.
        priority = [n for n in ("vertical", "horizontal") if n in sources] if draft == "topk" else heads_order
        groups = {"none": groups, "fill": [*groups, "jacobi"], "first": ["jacobi", *groups]}[jacobi]
        super().__init__(sources, order=groups, priority=priority)
        self.heads, self.draft, self.horizontal, self.jacobi = heads, draft, horizontal, jacobi
        self.m, self.order = vertical_candidates, order

    @property
    def jdrafts(self):
        """The carried Jacobi drafts (:class:`~hawkspec.decoding.proposers.jacobi.JacobiDrafts`), or None."""
        src = self.sources.get("jacobi")
        return src.drafts if src is not None else None

    def describe(self) -> dict:
        return {"name": self.name, "draft": self.draft, "num_horizontal": self.heads.config.num_horizontal,
                "vsd": self.vsd, "vertical_candidates": self.m, "order": self.order, "horizontal": self.horizontal,
                "jacobi": self.jacobi}
