"""Tree walks for acceptance rules that judge every candidate on its own (``AcceptanceRule.independent``).

Medusa's typical acceptance (official ``evaluate_posterior``, ``sampling='typical'``) tests every candidate
against the target at its parent, independently of its siblings, and keeps the *longest* root-to-leaf path
whose candidates all pass; among equally long paths, the one with the highest likelihood (sum of the log
target probabilities of its candidates); the next token (our bonus) comes from the target at the last
accepted node (the rule's :meth:`~hawkspec.decoding.acceptance.base.AcceptanceRule.bonus`). The recursive
walk of the exact rule (descend into the first accepted child) would instead stop at the first accepted
sibling even when a later sibling leads to a longer accepted path.

SJD-PAC's released sampler does the same on top of recursive rejection sampling (:func:`walk_longest_row`, for
rules with ``longest_row``: ``pac_released``): every node tested against its sibling-reduced residual, the longest
accepted row wins, the lowest on ties.
"""

from __future__ import annotations

import torch

from hawkspec.decoding.sampling import uniform


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


def walk_longest_row(rule, p, cand, q, forced, node_ok, children, anc, depth, active, width: int,
                     full_codes: int | None = None, generator=None):
    """SJD-PAC's released path choice (``SJDPACSpeculativeSampler.__call__`` L167-178, KangJialiang/SJD-PAC @
    4fbc099; BRIEF-2026 §2.2, §2.4 (1)): every node is tested with its own uniform against the recursive residual
    of its parent's target (rank b after the residuals of ranks 0..b-1, whether or not they were accepted) with the
    q the pool hands it; a row is a root-to-leaf path and its length the run of leading acceptances; the longest
    row wins, the lowest row on ties. Rows are numbered in rank order, so the lowest row through the deepest
    accepted nodes ends at the first of them in node order (nodes of one depth are numbered in rank-path order,
    :func:`hawkspec.decoding.tree.build_topology`). The bonus is drawn from the residual after every child of the
    last accepted node (all rejected, or the row could go on): the target itself below a leaf; a uniform over
    the codes when the row accepted all ``full_codes`` code depths (the released code's empty residual is padded
    with its uniform, L197-206). Lossy: RRS needs the first accepted sibling (:meth:`SpeculativeDecoder._walk_tries`).

    Args:
        rule: The acceptance rule (its :meth:`try_candidate` judges each node against the running residual).
        p: (B, T, K) the target at every node.
        cand: (B, T) the code of every node (-1 none; node 0 is the root).
        q: (B, T, K) the q each node was drawn from, or None for point masses.
        forced: (B, T) forced (end-of-line) nodes: accepted without a test, the residual untouched.
        node_ok: (B, T) nodes taking part. children: (B, T, C) each node's children in rank order, -1 padded.
        anc: (B, T, T) ancestor-or-self masks. depth: (B, T) body offsets. active: (B,) rows still decoding.
        width: Path entries returned (the engine's ``path_width``).
        full_codes: Code depths of an untruncated tree: a row accepting that many draws its bonus uniformly.

    Returns:
        ``cur`` (B,), ``path`` (B, width), ``n_path`` (B,) and the residual (B, K) the bonus is drawn from.
    """
    B, T, K = p.shape
    dev = p.device
    ar = torch.arange(B, device=dev)
    u = uniform((B, T), generator, dev)  # one per node (the root's unused): static draws
    r = p  # (B, T, K) the running residual below every node
    acc = torch.zeros((B, T + 1), dtype=torch.bool, device=dev)  # column T takes the writes of missing children
    for i in range(children.shape[-1]):  # rank i under every parent at once
        child = children[..., i]
        c = child.clamp(min=0)
        live = (child >= 0) & node_ok.gather(1, c) & active[:, None]
        f = forced.gather(1, c)
        qc = None if q is None else q.gather(1, c[..., None].expand(-1, -1, K)).reshape(-1, K)
        ok, r_new = rule.try_candidate(r.reshape(-1, K), cand.gather(1, c).clamp(min=0).reshape(-1), qc,
                                       u.gather(1, c).reshape(-1))
        acc.scatter_(1, torch.where(live, child, T), live & (f | ok.view(B, T)))
        r = torch.where((live & ~f)[..., None], r_new.view(B, T, K), r)
    acc = acc[:, :T]
    acc[:, 0] = True
    on_path = ~(anc & ~acc[:, None, :]).any(-1) & (active[:, None] | (torch.arange(T, device=dev) == 0))
    cur = torch.where(on_path, depth, -1).argmax(1)  # the deepest; ties: the first in node order (lowest row)
    mine = anc[ar, cur]
    path = torch.argsort(torch.where(mine, depth, T + int(depth.max()) + 1), dim=1)[:, :width]
    n_path = mine.sum(1)
    r_final = r[ar, cur]
    if full_codes is not None:
        full = (mine & ~forced).sum(1) - 1 == full_codes
        r_final = torch.where(full[:, None], torch.full_like(r_final, 1.0 / K), r_final)
    return cur, path, n_path, r_final
