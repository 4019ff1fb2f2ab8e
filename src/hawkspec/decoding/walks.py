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

import abc

import torch

from hawkspec.decoding.sampling import uniform
from hawkspec.decoding.state import Verdict


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


# ------------------------------------------------------------------------------------------------ one signature
class Walk(abc.ABC):
    """A tree walk with the engine's one signature: ``walk(tree, p, active, rng) -> Verdict``.

    ``tree`` is the step's :class:`~hawkspec.decoding.state.Tree`, ``p`` (B, T, K) the acceptance rule's view of
    the target at every node, ``active`` (B,) the rows still decoding, ``rng`` the random source (a generator, or
    a static step's :class:`~hawkspec.decoding.sampling.Uniforms`). The rule, the table's sizes and whether the
    walk may read the device back to stop early are fixed when it is made (:func:`choose_walk`).
    """

    def __init__(self, rule, table, path_width: int, static: bool):
        self.rule, self.table, self.path_width, self.static = rule, table, path_width, static
        dev = table.depth.device
        self.arA = torch.arange(path_width, device=dev)

    @abc.abstractmethod
    def __call__(self, tree, p, active, rng) -> Verdict:
        """The accepted path and the bonus token of every row."""

    def describe(self) -> str:
        return type(self).__name__


class LongestWalk(Walk):
    """Rules that judge each node on its own (Medusa's typical): the longest accepted path (:func:`walk_longest`)."""

    def __call__(self, tree, p, active, rng) -> Verdict:
        t = tree
        return Verdict(*walk_longest(self.rule, p, t.cand, t.forced, t.node_ok, t.parent, t.anc, t.depth, active,
                                     self.table.max_depth, rng))


class LongestRowWalk(Walk):
    """SJD-PAC as released (``longest_row`` rules): the longest accepted row (:func:`walk_longest_row`; lossy)."""

    def __call__(self, tree, p, active, rng) -> Verdict:
        t, rule = tree, self.rule
        q = None
        if t.pools.q is not None:
            K = p.shape[-1]
            q = t.pools.q.flatten(1, 2).gather(1, t.slot[..., None].expand(-1, -1, K))  # (B, T, K)
        full = self.table.max_code_depth if getattr(rule, "full_row_bonus", "target") == "uniform" else None
        cur, path, n_path, r = walk_longest_row(rule, p, t.cand, q, t.forced, t.node_ok, t.children, t.anc,
                                                t.depth, active, self.path_width, full, rng)
        return Verdict(cur, path, n_path, rule.bonus(r, rng))


class TriesWalk(Walk):
    """General trees: the children of the current node tried in order with the acceptance rule against the
    residual; the first accepted one is descended into (recursive rejection sampling). The bonus is drawn from the
    last residual.

    Every (level, child) slot is tried for every row at once and the rows that were not really trying it are
    masked out (each row's uniform for a slot is drawn up front, so masking changes no decision). Eager, the loops
    stop as soon as no row is left trying (one read-back per slot); in a static step they run their bounded length
    and read nothing back."""

    def __call__(self, tree, p, active, rng) -> Verdict:
        t, tab, rule = tree, self.table, self.rule
        B, dev = p.shape[0], p.device
        ar = torch.arange(B, device=dev)
        cur = torch.zeros(B, dtype=torch.long, device=dev)
        path = torch.zeros((B, self.path_width), dtype=torch.long, device=dev)
        n_path = torch.ones(B, dtype=torch.long, device=dev)
        alive = active.clone()
        r = p[ar, cur]
        u = uniform((B, tab.max_depth, tab.num_children), rng, dev)
        eager = not self.static
        for level in range(tab.max_depth):
            moved = torch.zeros(B, dtype=torch.bool, device=dev)
            for i in range(tab.num_children):
                child = t.children[ar, cur, i]
                child_c = child.clamp(min=0)
                trying = alive & ~moved & (child >= 0) & t.node_ok[ar, child_c]
                if eager and not trying.any():  # children are packed first: nobody tries a later one either
                    break
                acc = trying & t.forced[ar, child_c]  # forced tokens are accepted without a test
                test = trying & ~acc
                q = None if t.pools.q is None else t.pools.q[ar, t.code_depth[ar, child_c], t.rank[ar, child_c]]
                ok, r_new = rule.try_candidate(r, t.cand[ar, child_c].clamp(min=0), q, u[:, level, i])
                acc |= test & ok
                r = torch.where((test & ~ok).unsqueeze(-1), r_new, r)
                cur = torch.where(acc, child_c, cur)
                moved |= acc
            if eager and not moved.any():
                break
            slot = n_path.clamp(max=self.path_width - 1).unsqueeze(1)
            path.scatter_(1, slot, torch.where(moved, cur, path.gather(1, slot).squeeze(1)).unsqueeze(1))
            n_path += moved.long()
            r = torch.where(moved.unsqueeze(-1), p[ar, cur], r)
            alive &= moved
        return Verdict(cur, path, n_path, rule.bonus(r, rng))


class ChainWalk(Walk):
    """Chains (SJD's window: every node has at most one child, node i + 1 under node i): each node is tried
    against its parent's untouched target, so every test runs at once and the path is the run of leading
    acceptances. Same decisions and residuals as :class:`TriesWalk`, without a loop over levels."""

    def __call__(self, tree, p, active, rng) -> Verdict:
        t, rule = tree, self.rule
        B, T, K = p.shape
        ar = torch.arange(B, device=p.device)
        x = t.cand[:, 1:]  # (B, T-1) node i+1 judged by node i's target
        r = p[:, :-1]
        q = None
        if t.pools.q is not None:
            q = t.pools.q.flatten(1, 2).gather(1, t.slot[:, 1:, None].expand(-1, -1, K)).reshape(-1, K)
        u = uniform((B, T - 1), rng, p.device)
        ok, r_new = rule.try_candidate(r.reshape(-1, K), x.clamp(min=0).reshape(-1), q, u.reshape(-1))
        tried = t.node_ok[:, 1:] & active[:, None]
        acc = tried & (t.forced[:, 1:] | ok.view(B, T - 1))
        n_acc = acc.long().cumprod(1).sum(1)  # (B,) leading acceptances
        n_path = n_acc + 1
        path = torch.where(self.arA < n_path[:, None], self.arA, 0)
        cur = n_acc
        # the bonus comes from the residual of the rejected child, or from the target where nothing was tried
        nxt = cur.clamp(max=T - 2)
        rejected = (cur < T - 1) & tried.gather(1, nxt[:, None]).squeeze(1)
        r_final = torch.where(rejected[:, None], r_new.view(B, T - 1, K)[ar, nxt], p[ar, cur])
        return Verdict(cur, path, n_path, rule.bonus(r_final, rng))


class PointMassWalk(Walk):
    """Trees of point-mass (top-k) drafts under a rule with :attr:`~hawkspec.decoding.acceptance.base.
    AcceptanceRule.point_mass_shortcut`: one draw of the target per node (:meth:`AcceptanceRule.draw`); a node is
    accepted iff its token equals its parent's draw (forced nodes always) and so is every ancestor; the deepest
    accepted node ends the path and its draw is the bonus token. No loop over levels.

    Whether a proposer's drafts are point masses is what its pools say (``Pools.q is None``): a proposer with
    sampled drafts (Jacobi's, ``draft: sample``) is walked by ``sampled``, the walk it would have otherwise; so is a
    rule whose :meth:`~hawkspec.decoding.acceptance.base.AcceptanceRule.draw` declines (returns None)."""

    def __init__(self, rule, table, path_width: int, static: bool, sampled: Walk):
        super().__init__(rule, table, path_width, static)
        self.sampled = sampled
        self.arT = torch.arange(table.num_nodes, device=table.depth.device)

    def __call__(self, tree, p, active, rng) -> Verdict:
        t = tree
        if t.pools.q is not None:
            return self.sampled(tree, p, active, rng)
        y = self.rule.draw(p, rng)
        if y is None:  # a rule that declines the shortcut (AcceptanceRule.draw): its children are tried in turn
            return self.sampled(tree, p, active, rng)
        T = y.shape[1]
        match = t.node_ok & (t.forced | (t.cand == y.gather(1, t.parent.clamp(min=0))))
        match[:, 0] = True
        on_path = ~(t.anc & ~match.unsqueeze(1)).any(-1)  # every ancestor-or-self matches
        on_path &= active.unsqueeze(1) | (self.arT[:T] == 0)
        key = torch.where(on_path, t.depth, T + self.table.max_depth + 1)  # siblings never both match
        path = torch.argsort(key, dim=1)[:, : self.path_width]
        n_path = on_path.sum(1)
        cur = path.gather(1, (n_path - 1).unsqueeze(1)).squeeze(1)
        return Verdict(cur, path, n_path, y.gather(1, cur.unsqueeze(1)).squeeze(1))

    def describe(self) -> str:
        return f"PointMassWalk (sampled drafts: {self.sampled.describe()})"


def choose_walk(rule, table, path_width: int, is_chain: bool, static: bool) -> Walk:
    """The walk a decoder uses for every step, chosen once from what its rule and tree allow (the same decisions
    whichever applies):

    * independent rules (Medusa's typical): every node judged on its own, the longest accepted path;
    * ``longest_row`` rules (SJD-PAC as released): the longest accepted row (lossy);
    * chains: every node against its parent's untouched target at once; otherwise children tried in order;
    * point-mass drafts under a rule with the shortcut: one draw per node (sampled drafts: the walk above).
    """
    if rule.independent:
        return LongestWalk(rule, table, path_width, static)
    if rule.longest_row:
        return LongestRowWalk(rule, table, path_width, static)
    walk = (ChainWalk if is_chain else TriesWalk)(rule, table, path_width, static)
    if rule.point_mass_shortcut:
        return PointMassWalk(rule, table, path_width, static, sampled=walk)
    return walk
