"""Proposers (``<decoder>.proposer._target_``) and the draft sources a composed proposer is made of.

One protocol, :class:`Proposer` (``DraftSource`` is the same class): what the engine drives and what a
:class:`SpatialProposer` is composed of. Medusa, Hawk, Hawk + Jacobi, Hawk's vertical-only ablation and Hawk +
EAGLE are :class:`SpatialProposer` compositions of the :mod:`~hawkspec.decoding.proposers.sources` written in
``conf/decoder/proposer/*.yaml``; SJD's :class:`JacobiProposer`, SJD-PAC's :class:`PACProposer` and
:class:`EagleProposer` draft on their own (and any of them can be a source too).
"""

from hawkspec.decoding.proposers.base import DRAFTS, Pools, Proposer
from hawkspec.decoding.proposers.eagle import EagleProposer
from hawkspec.decoding.proposers.jacobi import JacobiProposer
from hawkspec.decoding.proposers.pac import PACProposer
from hawkspec.decoding.proposers.sources import (DraftSource, EagleSource, HorizontalSource, JacobiSource,
                                                 VerticalSource)
from hawkspec.decoding.proposers.spatial import SpatialProposer

__all__ = ["DRAFTS", "Pools", "Proposer", "SpatialProposer", "JacobiProposer", "EagleProposer", "PACProposer",
           "DraftSource", "HorizontalSource", "VerticalSource", "JacobiSource", "EagleSource"]
