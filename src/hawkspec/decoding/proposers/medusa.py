"""Medusa: horizontal draft heads on the last accepted hidden state; head k drafts the k-th token after next.

A :class:`~hawkspec.decoding.proposers.spatial.SpatialProposer` of one
:class:`~hawkspec.decoding.proposers.sources.HorizontalSource`; its pools are that source's candidates.
"""

from __future__ import annotations

from hawkspec.decoding.proposers.sources import DRAFTS, HorizontalSource
from hawkspec.decoding.proposers.spatial import SpatialProposer
from hawkspec.heads.draft import DraftHeads


class MedusaProposer(SpatialProposer):
    """Candidates for the code at body position p are head ``p - root``'s top-k (or samples from it).

    Args:
        heads: Trained draft heads (only the horizontal ones are used); ``build_decoder`` loads them from
            ``decoder.heads_path``.
        draft: ``topk`` (deterministic candidates, point masses) or ``sample`` (i.i.d. draws from the head's
            distribution under the target's top-k/temperature).
    """

    name = "medusa"

    def __init__(self, heads: DraftHeads, draft: str = "topk"):
        if draft not in DRAFTS:
            raise ValueError(f"decoder.proposer.draft must be 'topk' or 'sample', got {draft!r}")
        super().__init__({"horizontal": HorizontalSource(heads, draft=draft, key="decoder.heads_path")})
        self.heads, self.draft = heads, draft

    def describe(self) -> dict:
        return {"name": self.name, "draft": self.draft, "num_horizontal": self.heads.config.num_horizontal}
