"""SJD-PAC (Proactive drafting + Adaptive Continuation, CVPR 2026, KangJialiang/SJD-PAC), exact: a training-free
proposer. BRIEF-2026 §2; the released sampler is not exact (§2.4), this one is (invariants I1-I4, §6).

**Proactive drafting: the tree.** ``L`` nodes per forward (root included): a ``K``-ary part of depth ``D`` (every
node at depth ``j - 1 < D - 1`` has the same ``K`` children, ranks ``0..K-1`` at depth ``j``) and a main chain
continuing the rank-0 branch up to ``L`` nodes (:func:`pac_paths`; the engine's ``decoder.tree`` takes it as
``pac: {nodes, width, depth}``; forced end-of-line tokens are spliced in as extra nodes, one per parent, as in
every tree). One recorded q per position, shared by every node at that depth. The ``K``
siblings of a position are drawn *without replacement* from that q, so the draft of rank ``b`` is a draw from
q with ranks ``0..b-1`` zeroed and renormalised, and that is the q the pool hands the exact rule for it. The
engine tries siblings in rank order against the residual (recursive rejection sampling) and descends into the
*first* accepted one (the released code takes the longest accepted root-to-leaf row instead, which is biased:
``tests/decoding/test_sjd_pac.py``).

**Adaptive continuation: the carried drafts.** After each verification forward, every position past the commit
that a node predicted gets new drafts from the target at the node before it, p_stale, which becomes its recorded
q. The node: on the accepted path's rank-0 continuation where the tree has one (the node before it on the chosen
path, then rank 0 down from it), else on the main chain. Rank 0 is the speculative-sampling (maximal) coupling
of the old rank-0 draft d (recorded q_old) with p_stale: keep d with probability min(1, p_stale(d) / q_old(d)),
else draw from norm(max(p_stale - q_old, 0)) -- a draw from p_stale whatever q_old is; ranks ``1..K-1`` are drawn
without replacement from p_stale with rank 0 excluded (Gumbel-top-(K-1) of log p_stale, fresh noise through
:func:`~hawkspec.decoding.sampling.uniform`). Together the K ranks are a without-replacement sample of p_stale,
so the exact rule stays lossless. (The released code draws ranks >= 1 from the residual, which is not the q
its test assumes, and resamples inside-tree columns from the last sibling's residual: BRIEF §2.4 (2), (3).)
Ranks a p_stale cannot fill (its support is smaller than K, e.g. a greedy target) stay empty.

**Fresh positions** (never predicted by a forward): K distinct codes uniformly at random, in random order
(Gumbel-top-K of equal logits), with q uniform over the codes -- the released code's choice. SJD's one-hot q
(``init_q: onehot`` of the ``jacobi`` proposer) cannot carry K siblings drawn without replacement from one q.

No plain-AR edges: as the released code, drafting starts at the first generated token.

**As released** (``siblings: residual``, the preset ``sjd_pac_released``; lossy, BRIEF-2026 §2.4 (2), (3),
``SJDPACSpeculativeSampler.__call__`` L180-220): the K drafts of a carried position are K draws without replacement
from a residual (:func:`residual_continuation`): rank 0 is kept if its keep test passes and ranks 1..K-1 are then
the first K-1 draws of the node's own residual ``max(p_stale - q_old, 0)``; on a rejection all K ranks are draws
of that residual -- or, inside the K-ary part, of the residual after the LAST sibling at that position (RRS through
every old rank), whichever sibling would have been accepted. Below a side leaf: draws of p_stale itself; below the
main chain's last node: nothing (the position stays fresh: uniform, as the released code pads it). Ranks >= 1 are
then not draws from the recorded q less rank 0, which the exact test assumes.

Every step draws the same number of uniforms (static draws).
"""

from __future__ import annotations

import torch

from hawkspec.decoding.proposers.base import Pools, Proposer
from hawkspec.decoding.sampling import sample, uniform
from hawkspec.decoding.tree import TopologyTable, normalize_paths

SIBLINGS = ("without_replacement", "residual")


def pac_tree_sizes(nodes: int, width: int, depth: int) -> tuple[int, int]:
    """(T, M): nodes of the K-ary part (root included, depths 0..D-1) and of the main path (root included)."""
    tree = sum(width**j for j in range(depth))
    return tree, depth + nodes - tree


def pac_paths(nodes: int, width: int, depth: int) -> list[tuple[int, ...]]:
    """SJD-PAC's static tree as rank paths (``generate_tree_mask_and_retrieve``): ``nodes`` = L tokens per forward,
    root included; ``width`` = K siblings per position at depths 1..D-1; ``depth`` = D, the depths 0..D-1 of the
    K-ary part; the remaining ``L - (K^D - 1)/(K - 1)`` nodes continue the rank-0 branch as a chain.

    K=3, D=3, L=16: ``(0) (1) (2)``, the 9 pairs ``(a, b)``, then ``(0,0,0) (0,0,0,0) (0,0,0,0,0)``.
    """
    for key, v, lo in (("nodes", nodes, 2), ("width", width, 1), ("depth", depth, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"decoder.tree.pac.{key} must be an integer >= {lo}, got {v!r}")
    tree, main = pac_tree_sizes(nodes, width, depth)
    if nodes < tree:
        raise ValueError(f"decoder.tree.pac: a {width}-ary part of depth {depth} has {tree} nodes, more than "
                         f"nodes={nodes}: raise nodes or lower width / depth")
    paths: list[tuple[int, ...]] = [()]
    out: list[tuple[int, ...]] = []
    for _ in range(1, depth):  # the K-ary part: depths 1..D-1
        paths = [p + (r,) for p in paths for r in range(width)]
        out += paths
    out += [(0,) * j for j in range(depth, main)]  # the main chain: depths D..M-1
    return normalize_paths(out) if out else []



def rank_pools(tok: torch.Tensor, q: torch.Tensor, pool_size: int, q_rest: torch.Tensor | None = None):
    """Pools of siblings drawn without replacement: rank b's q is its base q (rank 0: ``q``; ranks >= 1: ``q_rest``
    when given, else ``q``) with ranks 0..b-1 zeroed, renormalised. tok (B, J, K), q (B, J, V) -> (B, J, P), (B, J, P, V)."""
    B, J, K = tok.shape
    pool_tok = torch.full((B, J, pool_size), -1, dtype=torch.long, device=tok.device)
    pool_q = q.new_zeros((B, J, pool_size, q.shape[-1]))
    qb = q
    for b in range(min(pool_size, K)):
        pool_tok[..., b] = tok[..., b]
        pool_q[..., b, :] = qb / qb.sum(-1, keepdim=True).clamp_min(1e-30)
        if b == 0 and q_rest is not None:
            qb = q_rest
        qb = qb.scatter(-1, tok[..., b : b + 1].clamp(min=0), 0.0)
    return pool_tok, pool_q

class PACProposer(Proposer):
    """SJD-PAC's drafts, exact (see the module docstring).

    Args:
        nodes, width, depth: The tree (``decoder.tree.pac``, which the preset also hands the engine): L, K, D.
        siblings: ``without_replacement`` (exact: rank 0 the keep-or-resample coupling, ranks 1..K-1 without
            replacement from p_stale) or ``residual`` (the released code, lossy: :func:`residual_continuation`).
    """

    name = kind = "pac"
    wants_tree_outputs = True
    ready_pool = True
    state_names = ("tok", "q", "_bidx", "_topo", "_pool_tok")

    def __init__(self, nodes: int = 64, width: int = 3, depth: int = 3, key: str | None = None,
                 siblings: str = "without_replacement"):
        if siblings not in SIBLINGS:
            raise ValueError(f"{key or 'decoder.proposer'}.siblings must be one of {SIBLINGS}, got {siblings!r}")
        self.siblings = siblings
        self.key = key
        self.paths = pac_paths(nodes, width, depth)
        if not self.paths:
            raise ValueError("decoder.tree.pac gives no draft: nodes must be >= 2")
        self.nodes, self.width, self.depth = nodes, width, depth

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        self.V = backbone.num_codes
        if self.width > self.V:
            raise ValueError(f"decoder.tree.pac.width={self.width} exceeds the codebook size {self.V}")
        grid = backbone.grid
        self.L = grid.length
        dev = backbone.code_token_ids.device
        self.table = TopologyTable(self.paths, grid).to(dev)
        forced = grid.forced_mask().to(dev)
        self._open = torch.cat([~forced, forced.new_zeros(1)])  # a position takes drafts; index L: outside

    def start(self, batch_size: int, device: torch.device) -> None:
        K, L = self.width, self.L
        # one spare column (index L) absorbs writes for positions outside the image
        self.tok = torch.full((batch_size, L + 1, K), -1, dtype=torch.long, device=device)  # ranks 0..K-1
        self.q = torch.zeros((batch_size, L + 1, self.V), device=device)  # the recorded q of each position
        self._bidx = torch.arange(batch_size, device=device)[:, None]

    # ------------------------------------------------------------------------------------------- propose
    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        B, J = code_pos.shape
        K, V, dev = self.width, self.V, code_pos.device
        if J != self.table.max_code_depth:
            tree = f"{self.where().rsplit('.proposer', 1)[0]}.tree"
            raise ValueError(f"the pac proposer's tree ({self.where()} nodes/width/depth: {self.nodes}/{self.width}/"
                             f"{self.depth}) is not the engine's ({tree}, {J} code depths): set both from {tree}.pac")
        self._topo = self.table.lookup(root_pos)
        ok = (code_pos >= 0) & self._open[torch.where(code_pos >= 0, code_pos, self.L)]
        slot = torch.where(ok, code_pos, self.L)
        tok, q = self.tok[self._bidx, slot], self.q[self._bidx, slot]  # (B, J, K), (B, J, V)
        # fresh positions: K distinct codes uniformly, in random order (top-K of i.i.d. uniforms), q uniform
        keys = uniform((B, J, V), generator, dev)  # drawn every step: static draws
        init = keys.topk(K, dim=-1).indices
        fresh = ok & (tok[..., 0] < 0)
        tok = torch.where(fresh[..., None], init, tok)
        q = torch.where(fresh[..., None], torch.full_like(q, 1.0 / V), q)
        fslot = torch.where(fresh, code_pos, self.L)
        self.tok[self._bidx, fslot] = torch.where(fresh[..., None], init, -1)
        self.q[self._bidx, fslot] = q
        tok = torch.where(ok[..., None], tok, -1)
        pool_tok, pool_q = rank_pools(tok, q, pool_size)
        self._pool_tok = pool_tok
        return Pools(pool_tok, pool_q)

    # ------------------------------------------------------------------------------------------- refresh
    def observe_tree(self, probs, node_pos, codes, generator, chain=False) -> None:
        B, T = node_pos.shape
        tab, topo, dev = self.table, self._topo, node_pos.device
        if T != tab.num_nodes:
            raise ValueError(f"the pac proposer's tree has {tab.num_nodes} nodes, the engine's {T}: set "
                             f"the tree and {self.where()} from the same tree.pac")
        K, V, L = self.width, self.V, self.L
        parent_anc, rank, forced, depth = tab.mask[topo], tab.rank[topo], tab.forced[topo], tab.depth[topo]
        P = self._pool_tok.shape[-1]
        cand = self._pool_tok.flatten(1).gather(1, tab.code_depth[topo] * P + rank)
        # the accepted path: every ancestor-or-self holds the code committed at its position (siblings differ)
        here = codes.gather(1, node_pos.clamp(0, L - 1))
        match = (node_pos >= 0) & (forced | (here == cand))
        match[:, 0] = True
        on_path = ~(parent_anc & ~match[:, None, :]).any(-1)
        cur_depth = torch.where(on_path, depth, -1).amax(1, keepdim=True)  # (B, 1)
        # its rank-0 continuation below the last accepted node
        cont = on_path | ((rank == 0) & (depth > cur_depth))
        ext = ~(parent_anc & ~cont[:, None, :]).any(-1) & (node_pos >= 0)
        target = node_pos + 1
        valid = node_pos >= 0
        # one node per predicted position: the continuation's, else the first (the main chain's)
        ar = torch.arange(T, device=dev)
        key = torch.where(ext, 0, T) + ar  # (B, T) lower wins
        same = (target[:, :, None] == target[:, None, :]) & valid[:, None, :]
        chosen = valid & ~(same & (key[:, None, :] < key[:, :, None])).any(-1)
        tclip = target.clamp(max=L - 1)
        ok = chosen & self._open[torch.where(valid, target, L)] & (codes.gather(1, tclip) < 0)
        slot = torch.where(ok, target, L)
        p = probs.float()
        if self.siblings == "residual":  # the released code: lossy (BRIEF-2026 §2.4 (2), (3))
            kids = (tab.children[topo] >= 0).sum(-1)  # (B, T) children of each predicting node
            ok &= (kids > 0) | (self.tok[self._bidx, slot, 0] >= 0)  # below the main chain's end: left fresh
            slot = torch.where(ok, target, L)
            new = residual_continuation(p, self.q[self._bidx, slot], self.tok[self._bidx, slot], kids, generator)
            self.tok[self._bidx, slot] = torch.where(ok[..., None], new, -1)
            self.q[self._bidx, slot] = p
            return
        # rank 0: keep-or-resample coupling of the old rank-0 draft with p_stale
        old = self.tok[self._bidx, slot, 0]  # (B, T), -1 none
        q_old = self.q[self._bidx, slot]  # (B, T, V)
        has = ok & (old >= 0)
        d = old.clamp(min=0).unsqueeze(-1)
        p_d, q_d = p.gather(-1, d).squeeze(-1), q_old.gather(-1, d).squeeze(-1)
        keep = has & (uniform(p_d.shape, generator, dev, p_d.dtype) * q_d < p_d)
        residual = (p - q_old).clamp(min=0)
        use = (has & (residual.sum(-1) > 0)).unsqueeze(-1)
        new0 = torch.where(keep, old, sample(torch.where(use, residual, p), generator))
        ranks = [new0]
        if K > 1:  # ranks 1..K-1: Gumbel-top-(K-1) of log p_stale over the codes but rank 0
            u = uniform((B, T, V), generator, dev).clamp_min(1e-30)
            g = p.log() - (-u.log()).log()
            g = g.scatter(-1, new0.unsqueeze(-1), float("-inf"))
            vals, idx = g.topk(K - 1, dim=-1)
            ranks += list(torch.where(vals > float("-inf"), idx, -1).unbind(-1))
        new = torch.stack(ranks, dim=-1)  # (B, T, K)
        self.tok[self._bidx, slot] = torch.where(ok[..., None], new, -1)
        self.q[self._bidx, slot] = p  # p_stale is the recorded q, kept or not

    def describe(self) -> dict:
        out = {"name": self.name, "nodes": self.nodes, "width": self.width, "depth": self.depth, "init_q": "uniform"}
        if self.siblings != "without_replacement":
            out["siblings"] = self.siblings
        return out


def residual_continuation(p: torch.Tensor, q_old: torch.Tensor, old: torch.Tensor, kids: torch.Tensor,
                          generator) -> torch.Tensor:
    """The released code's drafts for a carried position (``SJDPACSpeculativeSampler.__call__`` L180-214; lossy).

    Args:
        p: (..., V) p_stale, the target at the node predicting the position.
        q_old: (..., V) the position's recorded q. old: (..., K) its old ranks (-1 none).
        kids: (...) children of the predicting node in the tree: 0 below a leaf (no keep test: K draws of p),
            1 on the chain (the node's own residual), more inside the K-ary part (a rejected rank 0 is resampled
            from the residual after the LAST sibling, RRS through every old rank).

    Returns:
        (..., K) the new ranks: the kept rank 0 and the first K-1 draws without replacement of the residual, or
        its first K draws (-1 where the residual has fewer codes).
    """
    K, dev = old.shape[-1], p.device
    d = old[..., 0]
    tested = (d >= 0) & (kids > 0)
    dd = d.clamp(min=0).unsqueeze(-1)
    p_d, q_d = p.gather(-1, dd).squeeze(-1), q_old.gather(-1, dd).squeeze(-1)
    keep = tested & (uniform(p_d.shape, generator, dev, p_d.dtype) * q_d < p_d)
    r, qb = p, q_old  # recursive rejection sampling through the old ranks, each with q less the ranks before it
    for b in range(K):
        x = old[..., b : b + 1]
        rb = (r - qb / qb.sum(-1, keepdim=True).clamp_min(1e-30)).clamp(min=0)
        r = torch.where(x >= 0, rb / rb.sum(-1, keepdim=True).clamp_min(1e-30), r)
        qb = torch.where(x >= 0, qb.scatter(-1, x.clamp(min=0), 0.0), qb)
    res = torch.where(((kids > 1) & ~keep).unsqueeze(-1), r, (p - q_old).clamp(min=0))
    res = torch.where(tested.unsqueeze(-1), res, p)
    res = torch.where(res.sum(-1, keepdim=True) > 0, res, p)
    u = uniform(p.shape, generator, dev).clamp_min(1e-30)  # K draws without replacement: Gumbel-top-K
    vals, idx = (res.log() - (-u.log()).log()).topk(K, dim=-1)
    draws = torch.where(vals > float("-inf"), idx, -1)
    kept = torch.cat([d.unsqueeze(-1), draws[..., : K - 1]], dim=-1)
    return torch.where(keep.unsqueeze(-1), kept, draws)
