"""Acceptance rules. Each is built from its config node's ``_target_`` (``conf/decoder/acceptance/<rule>.yaml``);
``name`` is only how results and tables label it."""

from hawkspec.decoding.acceptance.base import AcceptanceRule
from hawkspec.decoding.acceptance.exact import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.acceptance.grouped import GroupedAcceptance
from hawkspec.decoding.acceptance.lantern import LanternAcceptance
from hawkspec.decoding.acceptance.pac_released import PACReleasedAcceptance
from hawkspec.decoding.acceptance.typical import TypicalAcceptance

__all__ = ["AcceptanceRule", "ExactAcceptance", "GreedyAcceptance", "TypicalAcceptance", "GroupedAcceptance",
           "LanternAcceptance", "PACReleasedAcceptance", "DECISION_SEMANTICS"]

# What every decision of a run rests on beyond each rule's own options (``results.json`` ->
# ``decision_semantics``; the tables' "Decision semantics" line). Each entry is the official code's behaviour.
DECISION_SEMANTICS = {
    "cfg_precision": "float32",  # streams cast to float32 before uncond + s * (cond - uncond), as Lumina-mGPT/SJD/GSD
    "gsd_tie_order": "token id",  # GSD's window: a stable ascending sort, ties in token-id order (official sort())
    "lantern_zeroing": "prefix",  # LANTERN's residual: zero the k+1 nearest whenever a neighbour prefix fits the
}                                 # bound (official `indices != -1`), not only when it added mass
