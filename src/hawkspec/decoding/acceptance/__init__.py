"""Acceptance rules, by registry name (``decoder.acceptance.name``)."""

from hawkspec.decoding.acceptance.base import AcceptanceRule
from hawkspec.decoding.acceptance.exact import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.acceptance.grouped import GroupedAcceptance
from hawkspec.decoding.acceptance.lantern import LanternAcceptance
from hawkspec.decoding.acceptance.typical import TypicalAcceptance

__all__ = ["AcceptanceRule", "ExactAcceptance", "GreedyAcceptance", "TypicalAcceptance", "GroupedAcceptance",
           "LanternAcceptance"]
