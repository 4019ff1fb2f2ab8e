"""SJD-PAC's released verification (KangJialiang/SJD-PAC @ 4fbc099, ``SJDPACSpeculativeSampler.__call__`` L134-222;
BRIEF-2026 §2.2, §2.4 (1)), labelled lossy, so the published numbers can be reproduced next to our exact ``sjd_pac``.

Each node's test is the exact one (accept ``x ~ q`` iff ``u q(x) < r(x)``, L171-174) against recursive rejection
sampling's residual (rank b tested against the target less ranks 0..b-1, with q less ranks 0..b-1, L152-165), but
the path is not the first accepted sibling's: **every** node is tested with its own uniform, the rows are the
root-to-leaf paths, and the row with the longest accepted prefix wins, the lowest row on ties (L175-178;
:func:`hawkspec.decoding.walks.walk_longest_row`). A sibling accepted earlier therefore loses to a later one whose
subtree accepted more: biased (BRIEF §2.4 (1); ``tests/decoding/test_sjd_pac_released.py``). The committed token
after the row (the new root) is drawn from the residual after the last sibling below the row's last accepted node
(L185-195; all of them were rejected, or the row would be longer), from the target itself below a side leaf (q
zeroed, L196), and -- ``full_row_bonus: uniform``, the released code -- uniformly over the image codes when the main
row accepted every draft (the residual is empty and the released code pads it with its uniform, L197-206).

The other two departures (the next tree's rank 0 resampled from the last sibling's residual inside the tree, and
ranks >= 1 drawn from a residual instead of without replacement from the recorded q) are the proposer's:
``siblings: residual`` of :class:`~hawkspec.decoding.proposers.PACProposer`; the preset ``sjd_pac_released`` sets both.
"""

from __future__ import annotations

from hawkspec.decoding.acceptance.base import AcceptanceRule
from hawkspec.decoding.acceptance.exact import exact_try

FULL_ROW_BONUSES = ("uniform", "target")


class PACReleasedAcceptance(AcceptanceRule):
    """The released SJD-PAC decision (lossy): node-wise exact tests under RRS, the longest accepted row wins.

    Args:
        full_row_bonus: The token after a main row whose every draft was accepted: ``uniform`` over the codes (the
            released code) or ``target`` (a draw from the target at the row's last node).
    """

    name = "pac_released"
    lossless = False
    longest_row = True
    point_mass_shortcut = False  # the shortcut is the first-accepted walk; this rule walks every row

    def __init__(self, full_row_bonus: str = "uniform"):
        if full_row_bonus not in FULL_ROW_BONUSES:
            raise ValueError(f"decoder.acceptance.full_row_bonus must be one of {FULL_ROW_BONUSES}, "
                             f"got {full_row_bonus!r}")
        self.full_row_bonus = full_row_bonus

    def try_candidate(self, r, x, q, u):
        return exact_try(r, x, q, u)

    def describe(self) -> dict:
        return {"name": self.name, "lossless": False, "walk": "longest_row", "full_row_bonus": self.full_row_bonus}
