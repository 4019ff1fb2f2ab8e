"""Candidate trees: their shape (rank paths), the forced tokens spliced into them, and their attention masks.

A tree is described Medusa-style by *rank paths* over the image codes that follow the root: ``(0,)`` is the
best candidate for the first speculated code, ``(0, 1)`` the second-best candidate for the second code below
it, and so on. Rank ``r`` at code depth ``j`` indexes the proposer's candidate pool for that position.

The root is the last committed, not yet forwarded token (body position ``n - 1``). Node depth is the body
offset from the root. A forced end-of-line token that falls inside the speculated span is spliced in as a
single node per parent, with no rank and no verification. Whether (and where) that happens depends on the
root's column and on how much image is left, so one :class:`TreeTopology` exists per such *phase*, all of
them precomputed into a padded :class:`TopologyTable` that the engine gathers per row.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from hawkspec.backbones.base import ImageGrid


def normalize_paths(paths: list) -> list[tuple[int, ...]]:
    """Sorted, prefix-closed rank paths (missing prefixes are added), root excluded."""
    out: set[tuple[int, ...]] = set()
    for p in paths:
        p = tuple(int(r) for r in p)
        if not p or min(p) < 0:
            raise ValueError(f"tree path {p} must be a non-empty tuple of ranks >= 0")
        for i in range(1, len(p) + 1):
            out.add(p[:i])
    return sorted(out, key=lambda q: (len(q), q))


def paths_from_budget(budget: int, max_depth: int, max_rank: int, decay: float = 0.6) -> list[tuple[int, ...]]:
    """The ``budget`` most promising rank paths under a simple prior, prefix-closed.

    The prior acceptance of a path is ``prod_i decay**... / (rank_i + 1)``: deeper and lower-ranked candidates
    are less likely to be accepted (Medusa builds its sparse trees the same way from measured accuracies).
    Best-first search keeps the set prefix-closed because a child never scores above its parent.
    """
    if budget < 1:
        raise ValueError(f"decoder.tree.budget must be >= 1, got {budget}")
    heap = [(-1.0 / (r + 1), (r,)) for r in range(max_rank)]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < budget:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < max_depth:
            for r in range(max_rank):
                heapq.heappush(heap, (neg * decay / (r + 1), path + (r,)))
    return normalize_paths(chosen)


@dataclass
class TreeTopology:
    """One tree, for one phase. Node 0 is the root.

    Attributes:
        depth: (T,) body offset of each node from the root.
        code_depth: (T,) index of the candidate pool the node draws from (0 for root and forced nodes).
        rank: (T,) rank in that pool (0 for root and forced nodes).
        parent: (T,) parent node, -1 for the root.
        forced: (T,) True for spliced end-of-line nodes.
        children: (T, C) child node ids in verification order, -1 padded.
    """

    depth: torch.Tensor
    code_depth: torch.Tensor
    rank: torch.Tensor
    parent: torch.Tensor
    forced: torch.Tensor
    children: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.depth.numel())


def build_topology(paths: list[tuple[int, ...]], forced_offsets: set[int], max_offset: int) -> TreeTopology:
    """Materialise rank paths for a root whose body offsets ``forced_offsets`` are forced.

    Args:
        paths: Prefix-closed rank paths (:func:`normalize_paths`).
        forced_offsets: Body offsets (>= 1) from the root that hold forced tokens.
        max_offset: Largest body offset still inside the image; deeper nodes are dropped.
    """
    depth, code_depth, rank, parent, forced = [0], [0], [0], [-1], [False]
    node_of: dict[tuple[int, ...], tuple[int, int]] = {(): (0, 0)}  # path -> (node, body offset)
    eol_child: dict[int, int] = {}

    def add(par: int, d: int, cd: int, r: int, f: bool) -> int:
        depth.append(d), code_depth.append(cd), rank.append(r), parent.append(par), forced.append(f)
        return len(depth) - 1

    for path in paths:
        if path[:-1] not in node_of:
            continue  # its parent fell off the image
        par, off = node_of[path[:-1]]
        off += 1
        while off in forced_offsets and off <= max_offset:  # splice the forced token(s)
            if par not in eol_child:
                eol_child[par] = add(par, off, 0, 0, True)
            par = eol_child[par]
            off += 1
        if off > max_offset:
            continue
        node_of[path] = (add(par, off, len(path) - 1, path[-1], False), off)
    # a forced token right after a leaf is still committed for free: nothing to add, the engine inserts it
    T = len(depth)
    kids: list[list[int]] = [[] for _ in range(T)]
    for i in range(1, T):
        kids[parent[i]].append(i)
    C = max(1, max(len(k) for k in kids))
    children = torch.full((T, C), -1, dtype=torch.long)
    for i, k in enumerate(kids):
        children[i, : len(k)] = torch.tensor(k, dtype=torch.long)
    return TreeTopology(
        depth=torch.tensor(depth), code_depth=torch.tensor(code_depth), rank=torch.tensor(rank),
        parent=torch.tensor(parent), forced=torch.tensor(forced), children=children,
    )


def ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """(n, T) parents (-1 for roots and padding) -> (n, T, T) bool: node i attends to j iff j is i or an
    ancestor of i. Precomputed once per table, so plain loops are fine."""
    n, T = parent.shape
    mask = torch.eye(T, dtype=torch.bool).repeat(n, 1, 1)
    par = parent.tolist()
    for t in range(n):
        for i in range(T):
            j = par[t][i]
            while j >= 0:
                mask[t, i, j] = True
                j = par[t][j]
    return mask


class TopologyTable:
    """Every phase's topology for one grid and one set of rank paths, padded to common sizes.

    Rows of a batch sit at different body positions; :meth:`lookup` maps each row's root position to its
    topology id, and the tensors below are gathered with those ids (no per-row Python in the step loop).
    Padding nodes are invalid: they attend to themselves only and are never tried.
    """

    def __init__(self, paths: list[tuple[int, ...]], grid: ImageGrid):
        self.paths = normalize_paths(paths)
        self.grid = grid
        self.max_code_depth = max(len(p) for p in self.paths)
        self.pool_sizes = [1 + max(p[j] for p in self.paths if len(p) > j) for j in range(self.max_code_depth)]
        W, L = grid.tokens_per_row, grid.length
        horizon = self.max_code_depth + self.max_code_depth // max(grid.cols, 1) + 2  # offsets a tree can reach
        topos: list[TreeTopology] = []
        key_to_id: dict[tuple, int] = {}
        self.ids = torch.zeros((W, horizon + 1), dtype=torch.long)  # [root column, min(remaining, horizon)]
        for col in range(W):
            for rem in range(horizon + 1):
                forced = {o for o in range(1, horizon + 1) if grid.eol and (col + o) % W == grid.cols}
                key = (frozenset(forced), rem)
                if key not in key_to_id:
                    key_to_id[key] = len(topos)
                    topos.append(build_topology(self.paths, forced, rem))
                self.ids[col, rem] = key_to_id[key]
        self.horizon = horizon
        self.num_nodes = max(t.size for t in topos)
        self.num_children = max(t.children.shape[1] for t in topos)
        self.max_depth = max(int(t.depth.max()) for t in topos)
        n, T, C = len(topos), self.num_nodes, self.num_children
        self.depth = torch.zeros((n, T), dtype=torch.long)
        self.code_depth = torch.zeros((n, T), dtype=torch.long)
        self.rank = torch.zeros((n, T), dtype=torch.long)
        self.parent = torch.full((n, T), -1, dtype=torch.long)
        self.forced = torch.zeros((n, T), dtype=torch.bool)
        self.valid = torch.zeros((n, T), dtype=torch.bool)
        self.children = torch.full((n, T, C), -1, dtype=torch.long)
        for i, t in enumerate(topos):
            s = t.size
            self.depth[i, :s], self.code_depth[i, :s], self.rank[i, :s] = t.depth, t.code_depth, t.rank
            self.parent[i, :s], self.forced[i, :s], self.valid[i, :s] = t.parent, t.forced, True
            self.children[i, :s, : t.children.shape[1]] = t.children
        self.mask = ancestor_mask(self.parent)  # (n, T, T)
        self.topologies = topos
        # every root position's topology id, so the decoding loop looks it up with one index
        pos = torch.arange(L)
        self.by_pos = self.ids[pos % W, (L - 1 - pos).clamp(0, horizon)]

    def lookup(self, root_pos: torch.Tensor) -> torch.Tensor:
        """(B,) body position of each row's root (0 <= root_pos < grid length) -> (B,) topology ids."""
        return self.by_pos[root_pos]

    def to(self, device) -> "TopologyTable":
        for name in ("ids", "by_pos", "depth", "code_depth", "rank", "parent", "forced", "valid", "children", "mask"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def select_subtree(node_logp: torch.Tensor, ok: torch.Tensor, anc: torch.Tensor, n: int) -> torch.Tensor:
    """EAGLE-2's dynamic tree over a static superset tree: each row keeps the ``n`` nodes with the highest
    cumulative draft log-probability (the product of the drafter's probabilities along the root-to-node path).

    Args:
        node_logp: (B, T) the drafter's log-probability of each node's own candidate (0 for the root and forced
            nodes, which cost nothing to accept).
        ok: (B, T) nodes that can take part (a candidate, a valid slot); the root must be True.
        anc: (B, T, T) ancestor-or-self masks; node indices put every parent before its children.
        n: Nodes to keep, root included.

    Returns:
        (B, n) long, the kept node indices in increasing order: prefix-closed (a child's score never exceeds its
        parent's, and ties go to the lower index), so every kept node's ancestors are kept.
    """
    B, T = node_logp.shape
    lp = torch.where(ok, node_logp, 0.0).float()
    score = (anc.float() @ lp.unsqueeze(-1)).squeeze(-1)  # (B, T) sum over ancestors-or-self
    broken = (anc & ~ok.unsqueeze(1)).any(-1)  # some ancestor (or itself) cannot take part
    key = torch.where(broken, torch.finfo(score.dtype).min, score)
    key[:, 0] = torch.finfo(score.dtype).max  # the root always
    order = torch.argsort(-key, dim=1, stable=True)[:, :n]
    return order.sort(dim=1).values
