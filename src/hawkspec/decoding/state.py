"""What one decoding call holds, and what each stage of a step hands the next (:mod:`hawkspec.decoding.engine`).

* :class:`Batch` -- per-call constants: sizes, the end-of-line token, the forced positions, index helpers. Frozen.
* :class:`DecodeState` -- the few tensors a step updates: committed tokens and codes, lengths, active rows, the
  carried hidden state, counters. What a static runner pins (:meth:`DecodeState.state`), with the KV state.
* One step's values, each made once and never changed: :class:`Step` (where every row is), the proposer's
  :class:`~hawkspec.decoding.proposers.base.Pools`, :class:`Tree` (:meth:`Tree.select` for dynamic trees),
  :class:`Forward` (the target at every node), :class:`Verdict` (the accepted path and bonus), and
  :class:`Outcome` (all of them, for the three commit stages).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hawkspec.decoding.proposers.base import Pools


@dataclass(frozen=True)
class Batch:
    """Per-call constants of B rows with body length L (tensors made once per decoder and batch size, so their
    memory never moves between batches: recorded CUDA graphs read them)."""

    B: int
    L: int
    S: int  # CFG streams
    device: torch.device
    eol: int  # the end-of-line input id (0 when the grid has none)
    forced_body: torch.Tensor  # (L + 1,) forced positions (column L: the spare one)
    ar: torch.Tensor  # arange(B)
    track_entropy: bool = False


@dataclass
class StepStats:
    """Per-row counters kept while decoding (for metrics)."""

    steps: torch.Tensor  # (B,) tree forwards each row took part in while active
    accepted: torch.Tensor  # (B,) draft tokens accepted (forced excluded)
    committed: torch.Tensor  # (B,) body tokens committed by tree steps (forced and bonus included)


@dataclass
class DecodeState:
    """The tensors a step updates (B rows; one spare column, index L, takes the writes of rows that commit
    nothing, so no step needs a ``nonzero()``)."""

    kv: object  # the backbone's KVState (updated in place by the backbone)
    tokens: torch.Tensor  # (B, L+1) committed input ids, -1 not yet
    codes: torch.Tensor  # (B, L+1) committed codes, -1 forced / not yet
    accept_map: torch.Tensor  # (B, L+1) 1.0 where a draft was accepted
    n: torch.Tensor  # (B,) committed body tokens
    active: torch.Tensor  # (B,) rows still decoding
    hidden: torch.Tensor  # (B, d) hidden state at each row's last forwarded token (the next drafts' source)
    stats: StepStats
    ent_sum: torch.Tensor  # () target entropy summed over the roots of active rows
    ent_n: torch.Tensor  # () how many

    _NAMES = ("tokens", "codes", "accept_map", "n", "active", "hidden", "ent_sum", "ent_n")

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor a step reads and writes, by name (what :class:`~hawkspec.decoding.static.Persistent`
        keeps in place); the KV state is the backbone's and is pinned on its own."""
        out = {name: getattr(self, name) for name in self._NAMES}
        out.update({f"stats.{f.name}": getattr(self.stats, f.name) for f in dataclasses.fields(self.stats)})
        return out

    def set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name.startswith("stats."):
                setattr(self.stats, name[len("stats."):], t)
            else:
                setattr(self, name, t)


@dataclass(frozen=True)
class Step:
    """Where every row stands at the start of a step."""

    root_pos: torch.Tensor  # (B,) the last committed body position (committed, not yet forwarded)
    topo: torch.Tensor  # (B,) each row's tree topology (forced tokens spliced in)
    code_pos: torch.Tensor  # (B, J) body position of each speculated code depth, -1 past the image
    active: torch.Tensor  # (B,) the rows this step decodes


@dataclass(frozen=True)
class Tree:
    """One step's trees, (B, T) per node unless noted; node 0 is each row's root."""

    pools: Pools
    depth: torch.Tensor  # position offset from the root
    code_depth: torch.Tensor  # which pool depth the node draws from
    rank: torch.Tensor  # which pool entry
    forced: torch.Tensor  # forced end-of-line node
    anc: torch.Tensor  # (B, T, T) ancestors-or-self in the topology
    parent: torch.Tensor  # parent node, -1 for the root
    children: torch.Tensor  # (B, T, C) child nodes in verification order, -1 padded
    slot: torch.Tensor  # flat index into the (J, P) pool
    cand: torch.Tensor  # the node's code, -1 none
    node_ok: torch.Tensor  # node takes part (valid, has a candidate, row active)
    node_tok: torch.Tensor  # the node's input id
    mask: torch.Tensor  # (B, T, T) the tree attention mask
    block: tuple | None = None  # with a lane: what is forwarded, tokens (B, T + M), mask and depths
    lane_pos: torch.Tensor | None = None  # (B, M) body positions of the lane nodes, -1 none (rows in flight)

    def select(self, sel: torch.Tensor, eye: torch.Tensor) -> "Tree":
        """The subtree of the nodes ``sel`` (B, n) keeps (increasing, prefix-closed, the root first), renumbered in
        order: parents, children and ancestor masks follow; ``eye`` is (n, n)."""
        B, n, T = sel.shape[0], sel.shape[1], self.cand.shape[1]
        inv = torch.full((B, T), -1, dtype=torch.long, device=sel.device)
        inv.scatter_(1, sel, torch.arange(n, device=sel.device).expand(B, n))

        def renum(old):
            return torch.where(old >= 0, inv.gather(1, old.clamp(min=0).flatten(1)).view(old.shape), -1)

        def pick(x):
            return x.gather(1, sel)

        children = renum(self.children.gather(1, sel.unsqueeze(-1).expand(-1, -1, self.children.shape[-1])))
        children = children.gather(-1, torch.argsort((children < 0).to(torch.int8), dim=-1, stable=True))
        anc = self.anc.gather(1, sel.unsqueeze(-1).expand(-1, -1, T)).gather(2, sel.unsqueeze(1).expand(-1, n, -1))
        node_ok = pick(self.node_ok)
        return Tree(pools=self.pools, depth=pick(self.depth), code_depth=pick(self.code_depth), rank=pick(self.rank),
                    forced=pick(self.forced), anc=anc, parent=renum(pick(self.parent)), children=children,
                    slot=pick(self.slot), cand=pick(self.cand), node_ok=node_ok, node_tok=pick(self.node_tok),
                    mask=(anc & node_ok.unsqueeze(1)) | eye)

    def with_lane(self, block: tuple, lane_pos: torch.Tensor) -> "Tree":
        """This tree with a lane of nodes after it in the forwarded block (rows in flight)."""
        return dataclasses.replace(self, block=block, lane_pos=lane_pos)

    @property
    def forwarded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the backbone forwards: tokens (B, N), mask (B, N, N) and depths (B, N)."""
        return self.block if self.block is not None else (self.node_tok, self.mask, self.depth)


@dataclass(frozen=True)
class Forward:
    """What the tree forward gave."""

    h: torch.Tensor  # (S*B, T, d) hidden states at the tree's nodes, both CFG streams
    p: torch.Tensor  # (B, T, K) the acceptance rule's view of the target at every node
    lane_p: torch.Tensor | None = None  # (B, M, K) the target at each lane node (its prediction's q)


@dataclass(frozen=True)
class Verdict:
    """The outcome of a walk, per row."""

    cur: torch.Tensor  # (B,) the last accepted node
    path: torch.Tensor  # (B, A) accepted nodes from the root, padded
    n_path: torch.Tensor  # (B,) nodes on the path, root included
    bonus: torch.Tensor  # (B,) the bonus code drawn at ``cur``


@dataclass(frozen=True)
class Outcome:
    """Everything a step decided: what the commit stages read (the path's positions made once for all three)."""

    at: Step
    tree: Tree
    fwd: Forward
    verdict: Verdict
    path_pos: torch.Tensor  # (B, A) body position of each node on the accepted path
    on_path: torch.Tensor  # (B, A) the first n_path entries of the path
    count: torch.Tensor  # (B,) nodes kept per row: n_path for active rows, 0 for the others
