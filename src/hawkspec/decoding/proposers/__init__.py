"""Proposers (``decoder.proposer._target_``) and the draft sources a composed proposer is made of.

:class:`SpatialProposer` merges any :mod:`~hawkspec.decoding.proposers.sources` (horizontal heads, the vertical
speculation cache, carried Jacobi drafts, the EAGLE draft model) into one spatial pool per position;
:class:`MedusaProposer` and :class:`HawkProposer` are such compositions behind their historical flags.
"""

from hawkspec.decoding.proposers.base import Pools, Proposer
from hawkspec.decoding.proposers.eagle import EagleProposer
from hawkspec.decoding.proposers.hawk import HawkProposer
from hawkspec.decoding.proposers.jacobi import JacobiProposer
from hawkspec.decoding.proposers.medusa import MedusaProposer
from hawkspec.decoding.proposers.pac import PACProposer
from hawkspec.decoding.proposers.sources import (DraftSource, EagleSource, HorizontalSource, JacobiSource,
                                                 VerticalSource)
from hawkspec.decoding.proposers.spatial import SpatialProposer

__all__ = ["Pools", "Proposer", "SpatialProposer", "MedusaProposer", "HawkProposer", "JacobiProposer",
           "EagleProposer", "PACProposer", "DraftSource", "HorizontalSource", "VerticalSource", "JacobiSource",
           "EagleSource"]
