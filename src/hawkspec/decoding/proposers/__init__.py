"""Proposers (``<decoder>.proposer._target_``) and the draft sources a composed proposer is made of.

One protocol, :class:`Proposer` (``DraftSource`` is the same class): what the engine drives and what a
:class:`SpatialProposer` is composed of. Each is built from its config node's ``_target_``
(``conf/decoder/proposer/<proposer>.yaml``, chosen by a preset's defaults list); nothing is looked up by name.
Medusa, Hawk, Hawk + Jacobi, Hawk's vertical-only ablation and Hawk + EAGLE are :class:`SpatialProposer`
compositions of the :mod:`~hawkspec.decoding.proposers.sources`; SJD's :class:`JacobiProposer` (SCD's couplings and
the spatial lane are its options), SJD-PAC's :class:`PACProposer`, Hawk + SJD-PAC's :class:`HawkPACProposer` and
:class:`EagleProposer` draft on their own (Jacobi and EAGLE can be sources too). The rows-in-flight decoders (ZipAR,
PJD) have no proposer: :mod:`hawkspec.decoding.rows`.
"""

from hawkspec.decoding.proposers.base import DRAFTS, Pools, Proposer
from hawkspec.decoding.proposers.eagle import EagleProposer
from hawkspec.decoding.proposers.hawk_pac import HawkPACProposer
from hawkspec.decoding.proposers.jacobi import JacobiProposer
from hawkspec.decoding.proposers.pac import PACProposer
from hawkspec.decoding.proposers.sources import (DraftSource, EagleSource, HorizontalSource, JacobiSource,
                                                 VerticalSource)
from hawkspec.decoding.proposers.spatial import SpatialProposer

__all__ = ["DRAFTS", "Pools", "Proposer", "SpatialProposer", "JacobiProposer", "EagleProposer", "PACProposer",
           "HawkPACProposer", "DraftSource", "HorizontalSource", "VerticalSource", "JacobiSource", "EagleSource"]
