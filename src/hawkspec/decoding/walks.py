"""Tree walks for acceptance rules that judge every candidate on its own (``AcceptanceRule.independent``).

Medusa's typical acceptance (official ``evaluate_posterior``, ``sampling='typical'``) tests every candidate
against the target at its parent, independently of its siblings, and keeps the *longest* root-to-leaf path
whose candidates all pass; among equally long paths, the one with the highest likelihood (sum of the log
target probabilities of its candidates); the next token (our bonus) comes from the target at the last
accepted node (the rule's :meth:`~hawkspec.decoding.acceptance.base.AcceptanceRule.bonus`). The recursive
walk of the exact rule (descend into the first accepted child) would instead stop at the first accepted
sibling even when a later sibling leads to a longer accepted path.
"""

from __future__ import annotations

import torch


def walk_longest(rule, p, cand, forced, node_ok, parent, anc, depth, active, max_depth: int, generator=None):
    """The longest accepted root-to-leaf path of every row's tree, all rows at once (no loop over levels).

    Args:
        rule: An acceptance rule with ``independent = True``.
        p: (B, T, K) the target at every node.
        cand: (B, T) the code of every node (-1 none; node 0 is the root).
        forced: (B, T) forced (end-of-line) nodes: accepted without a test.
        node_ok: (B, T) nodes present in this row's tree.
        parent: (B, T) each node's parent (-1 for the root).
        anc: (B, T, T) ancestor-or-self mask: ``anc[b, i, j]`` iff node j is on the path from the root to i.
        depth: (B, T) body offset of every node from the root.
        active: (B,) rows still decoding (the others keep just their root).
        max_depth: The deepest node of any topology (paths are ``max_depth + 1`` long).

    Returns:
        ``cur`` (B,) the last accepted node, ``path`` (B, max_depth + 1) the accepted nodes in depth order (the
        first ``n_path`` entries), ``n_path`` (B,) and the bonus token (B,) from the target at ``cur``.
    """
    B, T, K = p.shape
    ar = torch.arange(B, device=p.device)
    par = parent.clamp(min=0)
    p_parent = p.gather(1, par.unsqueeze(-1).expand(-1, -1, K))  # (B, T, K) each node's parent's target
    x = cand.clamp(min=0)
    ok = node_ok & (forced | rule.accept_independent(p_parent, x))
    ok[:, 0] = True
    on_path = ~(anc & ~ok.unsqueeze(1)).any(-1)  # every ancestor-or-self passes
    on_path &= active.unsqueeze(1) | (torch.arange(T, device=p.device) == 0)
    # likelihood of each path: sum of log p(candidate | parent) over its test-passing (non-forced) nodes
    logp = torch.where(forced | (parent < 0), 0.0, p_parent.gather(-1, x.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log())
    path_ll = (anc.float() * logp.unsqueeze(1)).sum(-1)  # (B, T)
    d = torch.where(on_path, depth, -1)
    deepest = d == d.max(1, keepdim=True).values
    cur = torch.where(deepest, path_ll, float("-inf")).argmax(1)  # ties: the first in node order
    mine = anc[ar, cur]  # (B, T) nodes on the chosen path
    key = torch.where(mine, depth, T + max_depth + 1)
    path = torch.argsort(key, dim=1)[:, : max_depth + 1]
    n_path = mine.sum(1)
    return cur, path, n_path, rule.bonus(p[ar, cur], generator)
