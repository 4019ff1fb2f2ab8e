"""Hawk: horizontal heads plus vertical heads whose drafts wait in a speculation cache until their row comes.

Every accepted token's hidden state runs through the vertical heads; head d's draft for the token d rows
below (body position ``s + d*W``) is stored in the *speculation cache*, keyed by that target position. When
decoding speculates position p, the fresh horizontal draft for p and the cached vertical drafts for p are
merged into one *spatial sampling pool* (in the configured verification order), and the tree draws its
candidates from the pool. The cache is a ring buffer over ``(vsd + 1) * W`` positions: a target is never
more than ``vsd * W`` ahead of the committed text.
"""

from __future__ import annotations

import torch

from hawkspec.decoding.proposers.base import Pools, dedupe_first
from hawkspec.decoding.proposers.jacobi import JacobiDrafts
from hawkspec.decoding.proposers.medusa import MedusaProposer
from hawkspec.heads.draft import DraftHeads

ORDERS = ("vertical_first", "horizontal_first", "interleave")
JACOBI = ("none", "fill", "first")


class HawkProposer(MedusaProposer):
    """Medusa's horizontal drafts merged with cached vertical drafts.

    Args:
        heads: Draft heads with vertical heads (``heads.vertical=true``).
        draft: ``topk`` or ``sample`` (see :class:`MedusaProposer`).
        vertical: Use the vertical heads (False = Medusa with Hawk's plumbing, for ablations).
        horizontal: Use the horizontal heads (False = drafts from the speculation cache only, the paper's
            "vertical-only" ablation).
        vsd: Vertical speculation depth used at decoding, <= the heads' vsd (None: all of them).
        vertical_candidates: Candidates each vertical head contributes per position (m).
        order: Merge order of the pool: ``vertical_first`` (the paper's), ``horizontal_first`` or
            ``interleave``.
        jacobi: Also take the drafts Jacobi iteration gets for free from the last verification forward (each
            uncommitted position the tree predicted, drawn from that node's output, see
            :class:`~hawkspec.decoding.proposers.jacobi.JacobiDrafts`): ``none`` (the paper's Hawk), ``fill``
            (into the first pool slot the heads leave empty: positions past the horizontal heads' reach that
            no vertical draft covers) or ``first`` (ahead of the heads' drafts; the heads then draft the
            positions Jacobi has not reached, where SJD starts from random codes). Ours, not the paper's.
            Exact with the exact rule: each draft keeps the distribution it was drawn from.
    """

    name = "hawk"

    def __init__(
        self, heads: DraftHeads, draft: str = "topk", vertical: bool = True, vsd: int | None = None,
        vertical_candidates: int = 1, order: str = "vertical_first", horizontal: bool = True, jacobi: str = "none",
    ):
        super().__init__(heads, draft)
        if jacobi not in JACOBI:
            raise ValueError(f"decoder.proposer.jacobi must be one of {JACOBI}, got {jacobi!r}")
        self.jacobi = jacobi
        if not (vertical or horizontal):
            raise ValueError("decoder.proposer: vertical=false and horizontal=false leave no drafts; enable one")
        self.horizontal = horizontal
        if order not in ORDERS:
            raise ValueError(f"decoder.proposer.order must be one of {ORDERS}, got {order!r}")
        have = heads.config.num_vertical
        if vertical and not have:
            raise ValueError("decoder.proposer.vertical=true needs heads trained with vertical heads (heads=hawk)")
        self.vsd = (vsd or have) if vertical else 0
        if self.vsd > have:
            raise ValueError(f"decoder.proposer.vsd={self.vsd} exceeds the heads' vertical depth {have}")
        if vertical_candidates < 1:
            raise ValueError(f"decoder.proposer.vertical_candidates must be >= 1, got {vertical_candidates}")
        self.m, self.order = vertical_candidates, order

    @property
    def wants_accepted_hidden(self) -> bool:
        return self.vsd > 0

    @property
    def wants_tree_outputs(self) -> bool:
        return self.jacobi != "none"

    def observe_tree(self, probs, node_pos, codes, generator, chain=False) -> None:
        self.jdrafts.observe(probs, node_pos, codes, generator, chain)

    def bind(self, backbone, sampling) -> None:
        super().bind(backbone, sampling)
        grid = backbone.grid
        self.W = grid.tokens_per_row
        self.R = (self.vsd + 1) * self.W
        dev = self.heads.device
        self._down = torch.arange(1, self.vsd + 1, device=dev) * self.W  # (vsd,) offset of vertical head d
        # a target is cached iff it lies in the image and is not a forced token: one lookup, any target
        forced = grid.forced_mask().to(dev)
        self._cacheable = torch.cat([~forced, forced.new_zeros(self.vsd * self.W + 1)])
        self.jdrafts = JacobiDrafts(grid, backbone.num_codes, self.heads.device) if self.wants_tree_outputs else None

    def start(self, batch_size: int, device: torch.device) -> None:
        B, R, V, m = batch_size, self.R, max(self.vsd, 1), self.m
        # one extra slot (index R) absorbs the writes of invalid targets, so filling needs no nonzero()
        self.ring_tok = torch.full((B, R + 1, V, m), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((B, R + 1, V), -1, dtype=torch.long, device=device)
        K = self.heads.num_codes
        self.ring_q = torch.zeros((B, R + 1, V, K), device=device) if self.draft == "sample" else None
        self._h_logits = None  # the horizontal heads' logits at the next src_hidden, made by observe()
        self._ar = torch.arange(B, device=device)
        self._bv = (self._ar.view(B, 1, 1), torch.arange(V, device=device).view(1, 1, V))
        if self.wants_tree_outputs:
            self.jdrafts.start(batch_size, device)

    def observe(self, hidden: torch.Tensor, positions: torch.Tensor, count: torch.Tensor) -> None:
        """Fill the speculation cache from every accepted token: hidden (B, A, d), positions (B, A).

        Every head runs here, once per step: the vertical heads on every accepted token, and the horizontal
        heads at the last one (the next step's ``src_hidden``), whose logits are kept for :meth:`propose`,
        which then needs no heads call of its own."""
        if not self.vsd:
            return
        n, vsd = self.heads.config.num_horizontal, self.vsd
        B, A = positions.shape
        feats = self.heads.features(hidden)  # (B, A, n + V, d) every head's ResBlocks, one batched call
        last = (count - 1).clamp(min=0)
        # the LM-head matmul is the costly part: only the rows needed (horizontal heads at the last token,
        # vertical heads at every token), in one call
        rows = torch.cat([feats[self._ar, last, :n], feats[:, :, n : n + vsd].flatten(1, 2)], dim=1)
        logits = self.heads.code_head(rows)  # (B, n + A * vsd, K)
        self._h_logits = logits[:, :n]  # (B, n, K)
        target = positions.unsqueeze(-1) + self._down  # (B, A, vsd)
        ok = (positions >= 0).unsqueeze(-1) & self._cacheable[target.clamp(min=0)]
        tokens, q = self._candidates(logits[:, n:].view(B, A, vsd, -1), ok, self.m,
                                     None if self.draft == "topk" else self._generator)
        slot = torch.where(ok, target % self.R, self.R)  # (B, A, vsd); invalid -> the spare slot
        b, v = self._bv
        self.ring_tok[b, slot, v] = tokens
        self.ring_pos[b, slot, v] = torch.where(ok, target, -1)
        if q is not None:
            self.ring_q[b, slot, v] = q[..., 0, :]

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        pools = self._spatial_pool(src_hidden, root_pos, code_pos, pool_size, generator)
        return self._fill_jacobi(pools, code_pos) if self.wants_tree_outputs else pools

    def _fill_jacobi(self, pools: Pools, code_pos: torch.Tensor) -> Pools:
        """Put each position's carried Jacobi draft into the first empty pool slot (if any). The pool then
        mixes point masses and sampled drafts, so every member gets its q (one-hot for point masses)."""
        j_tok, j_q = self.jdrafts.lookup(code_pos)  # (B, J), (B, J, K)
        tokens, K, P = pools.tokens, j_q.shape[-1], pools.tokens.shape[-1]
        q = pools.q
        if q is None:
            q = torch.nn.functional.one_hot(tokens.clamp(min=0), K).to(j_q.dtype)
        have = (j_tok >= 0).unsqueeze(-1)  # (B, J, 1)
        if self.jacobi == "first":
            if P > 1:  # shift the heads' drafts one rank down where a Jacobi draft exists (a chain has one rank)
                shifted = torch.cat([tokens[..., :1], tokens[..., :-1]], dim=-1)
                tokens = torch.where(have, shifted, tokens)
                q = torch.where(have.unsqueeze(-1), torch.cat([q[..., :1, :], q[..., :-1, :]], dim=2), q)
            slot = have & (torch.arange(P, device=tokens.device) == 0)
        else:
            empty = tokens < 0
            slot = empty & (empty.cumsum(-1) == 1) & have  # (B, J, P)
        q = torch.where(slot.unsqueeze(-1), j_q.unsqueeze(2), q)
        return Pools(torch.where(slot, j_tok.unsqueeze(-1), tokens), q)

    def _spatial_pool(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        self._generator = generator
        B, J = code_pos.shape
        if self.horizontal:
            h_tok, h_q = self.horizontal_candidates(src_hidden, root_pos, code_pos, pool_size, generator,
                                                    logits=self._h_logits)
            self._h_logits = None
        else:
            h_tok = code_pos.new_full((B, J, pool_size), -1)
            h_q = None if self.draft == "topk" else torch.zeros((B, J, pool_size, self.heads.num_codes),
                                                                device=code_pos.device)
        if not self.vsd:
            return Pools(h_tok, h_q)
        slot = code_pos.clamp(min=0) % self.R  # (B, J)
        bidx = torch.arange(B, device=code_pos.device)[:, None]
        v_tok = self.vertical_drafts(code_pos, slot, bidx)  # (B, J, vsd*m)
        if self.draft == "topk":
            return Pools(self._merge(v_tok, h_tok, pool_size))
        # sampled drafts: duplicates are legitimate i.i.d. draws; keep each candidate's own q
        K = h_q.shape[-1]
        v_q = self.ring_q[bidx, slot].unsqueeze(-2).expand(B, J, self.vsd, self.m, K).flatten(2, 3)
        if self.order == "interleave":
            raise ValueError("decoder.proposer.order=interleave is only supported with draft=topk")
        tokens = torch.cat([v_tok, h_tok] if self.order == "vertical_first" else [h_tok, v_tok], dim=-1)
        q = torch.cat([v_q, h_q] if self.order == "vertical_first" else [h_q, v_q], dim=2)
        keep = tokens >= 0
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :pool_size]
        tokens = torch.where(keep, tokens, -1).gather(-1, order)
        q = q.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, K))
        return Pools(tokens, q)

    def vertical_drafts(self, code_pos: torch.Tensor, slot: torch.Tensor | None = None,
                        bidx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, J, vsd * m) the speculation cache's vertical drafts for body positions ``code_pos`` (B, J), -1
        where it holds none: what the pool merges, and what :mod:`hawkspec.analysis.acceptance` reads to tell
        which accepted tokens a vertical head drafted. ``slot``/``bidx``: the ring slots and batch index, when
        the caller has them."""
        if slot is None:
            slot = code_pos.clamp(min=0) % self.R
            bidx = torch.arange(code_pos.shape[0], device=code_pos.device)[:, None]
        hit = (self.ring_pos[bidx, slot] == code_pos.unsqueeze(-1)) & (code_pos.unsqueeze(-1) >= 0)  # (B, J, vsd)
        return torch.where(hit.unsqueeze(-1), self.ring_tok[bidx, slot], -1).flatten(2)

    def _merge(self, v_tok: torch.Tensor, h_tok: torch.Tensor, size: int) -> torch.Tensor:
        """The spatial sampling pool of point-mass candidates: (B, J, size).

        Membership is the same for every order — all cached vertical candidates, then the best horizontal
        ones until the pool is full — so the ``order`` ablation changes only the verification order (which
        candidate gets the deepest subtree), never which candidates exist.
        """
        members = dedupe_first(torch.cat([v_tok, h_tok], dim=-1), size)  # (B, J, size)
        if self.order == "vertical_first":
            return members
        big = 10_000

        def rank_in(src: torch.Tensor) -> torch.Tensor:  # position of each member in src, `big` if absent
            eq = (members.unsqueeze(-1) == src.unsqueeze(-2)) & (members.unsqueeze(-1) >= 0)
            idx = torch.arange(src.shape[-1], device=src.device).expand_as(eq)
            return torch.where(eq, idx, big).amin(-1)

        rv, rh = rank_in(v_tok), rank_in(h_tok)
        if self.order == "horizontal_first":
            key = torch.where(rh < big, rh, big + rv)
        else:  # interleave: v1, h1, v2, h2, ...
            key = torch.minimum(2 * rv, 2 * rh + 1)
        key = torch.where(members >= 0, key, 4 * big)
        return members.gather(-1, torch.argsort(key, dim=-1, stable=True))

    def describe(self) -> dict:
        return {**super().describe(), "name": self.name, "vsd": self.vsd, "vertical_candidates": self.m,
                "order": self.order, "horizontal": self.horizontal, "jacobi": self.jacobi}
