"""Proposers, by registry name (``decoder.proposer.name``)."""

from hawkspec.decoding.proposers.base import Pools, Proposer
from hawkspec.decoding.proposers.eagle import EagleProposer
from hawkspec.decoding.proposers.hawk import HawkProposer
from hawkspec.decoding.proposers.jacobi import JacobiProposer
from hawkspec.decoding.proposers.medusa import MedusaProposer

__all__ = ["Pools", "Proposer", "MedusaProposer", "HawkProposer", "JacobiProposer", "EagleProposer"]
