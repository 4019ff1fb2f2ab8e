"""Draft sources: the parts a :class:`~hawkspec.decoding.proposers.spatial.SpatialProposer` is composed of.

A source drafts candidates for the speculated positions of a step; the proposer merges the candidates of all
its sources into one *spatial sampling pool* per position (its ``order``). A source is a
:class:`~hawkspec.decoding.proposers.base.Proposer` like any other (``DraftSource`` is that one protocol), built
by Hydra from its ``_target_`` (``conf/decoder/proposer/*.yaml``), with the proposer's life cycle:

* :meth:`~Proposer.bind` (backbone, sampling, owner): load its checkpoint from its ``path`` (through the owner,
  so sources that read one folder share one module) and check it against the backbone; :meth:`~Proposer.link`
  runs once every source is bound (a source may work with a sibling, e.g. the vertical cache computes the
  horizontal heads' logits of the next step in the same call);
* :meth:`~Proposer.start` per batch; :meth:`~Proposer.state` names the tensors it keeps between steps;
* :meth:`~Proposer.propose` per step: ``Pools`` of any width ``C`` (B, J, C), -1 where it has none, with ``q``
  (the distribution each was drawn from) or ``None`` for point masses (deterministic top-k), and ``logp`` (the
  drafter's log-probability, what a dynamic tree ranks by) or ``None``;
* :meth:`~Proposer.observe` (accepted tokens and their hidden states) and :meth:`~Proposer.observe_tree` (the
  target at every tree node) after each step, for sources that set ``wants_accepted_hidden`` /
  ``wants_tree_outputs``. The engine calls ``observe_tree`` before ``observe``.

Sources here: :class:`HorizontalSource` (Medusa's heads), :class:`VerticalSource` (Hawk's vertical heads and
their speculation cache), :class:`JacobiSource` (the drafts Jacobi iteration carries from the last forward)
and :class:`EagleSource` (the EAGLE draft model: :class:`~hawkspec.decoding.proposers.EagleProposer` itself).
Every candidate keeps the distribution it came from, so any mix stays lossless under the exact rule.

Randomness: sampled drafts draw through :func:`hawkspec.decoding.sampling.sample` with the engine's generator.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hawkspec.backbones.base import check_identity
from hawkspec.decoding.proposers.base import DRAFTS, Pools, Proposer, check_choice
from hawkspec.decoding.proposers.eagle import EagleProposer
from hawkspec.decoding.proposers.jacobi import COUPLINGS, JacobiDrafts, check_lane, fit_lane
from hawkspec.decoding.sampling import sample, target_probs
from hawkspec.heads.draft import DraftHeads

DraftSource = Proposer
"""A draft source is a :class:`~hawkspec.decoding.proposers.base.Proposer`: one protocol for both."""

EagleSource = EagleProposer
"""The EAGLE draft model as a source (``_target_: hawkspec.decoding.proposers.sources.EagleSource``)."""


# --------------------------------------------------------------------------------------------- Medusa/Hawk heads
class HeadsSource(DraftSource):
    """A source drafting with :class:`~hawkspec.heads.draft.DraftHeads`: given as ``heads`` or loaded from
    ``path`` at bind (one load per folder per proposer, so horizontal and vertical sources share the module).

    Args:
        heads: Draft heads (tests, notebooks); then ``path`` is ignored.
        path: Folder of saved heads (``hawkspec-train heads=medusa|hawk``), loaded at :meth:`bind`.
        draft: One of :data:`~hawkspec.decoding.proposers.base.DRAFTS`: ``topk`` (deterministic candidates, point
            masses) or ``sample`` (i.i.d. draws from the head's distribution under the target's
            top-k/temperature, each with its q).
        key, path_key: Its config node and its checkpoint's key (see :class:`~hawkspec.decoding.proposers.Proposer`).

    Steps draft with :attr:`frozen` (:meth:`DraftHeads.frozen`: the heads' weights stacked once), taken at bind and
    again per batch (the same object unless the weights changed in between).

    Attributes:
        scores: Whether its pools carry ``Pools.logp`` (what only a dynamic tree reads); a driver that never reads
            them may set it False before the first batch (a composed proposer's :attr:`SpatialProposer.scores`
            sets its sources') and the step skips their work. Decisions are the same either way.
    """

    scores: bool = True

    def __init__(self, heads: DraftHeads | None = None, path: str | None = None, draft: str = "topk",
                 key: str | None = None, path_key: str | None = None):
        self.key, self.path_key, self.name = key, path_key, self.kind
        self.heads, self.path, self.draft = heads, path, check_choice(draft, DRAFTS, self.where("draft"))

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        if self.heads is None:
            self.heads = load_checkpoint(owner, DraftHeads, self.path, self.checkpoint_key, backbone)
        check_identity(self.heads.identity, backbone, "the draft heads",
                       f"Train heads for this backbone or set `{self.checkpoint_key}` to matching heads.")
        self.heads.to(next(iter(backbone.buffers())).device)
        self.frozen = self.heads.frozen()

    def start(self, batch_size: int, device: torch.device) -> None:
        self.frozen = self.heads.frozen()
        # (B, 1) the row index of a (B, J) lookup: one tensor per batch size for the source's life, so its memory
        # never moves from batch to batch (nothing a recorded step would have to pin)
        index = self.__dict__.setdefault("_row_index", {})
        if (batch_size, device) not in index:
            index[batch_size, device] = torch.arange(batch_size, device=device)[:, None]
        self._bidx = index[batch_size, device]

    def _candidates(self, logits: torch.Tensor, ok: torch.Tensor, size: int, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (..., K), ok (...) -> tokens (..., size) and q (..., size, K) or None."""
        if self.draft == "topk":
            tokens = logits.topk(size, dim=-1).indices
            return torch.where(ok.unsqueeze(-1), tokens, -1), None
        q = target_probs(logits, self.sampling)  # (..., K)
        tokens = sample(q.unsqueeze(-2).expand(*q.shape[:-1], size, q.shape[-1]), generator)  # (..., size)
        return torch.where(ok.unsqueeze(-1), tokens, -1), q.unsqueeze(-2).expand(*tokens.shape, q.shape[-1])


class HorizontalSource(HeadsSource):
    """Medusa's horizontal heads at the last accepted hidden state: head k drafts the code at body position
    ``root + k`` (its top-k, or samples from it); positions past the heads' reach get none."""

    kind = "horizontal"
    ready_pool = True
    state_names = ("next_logits",)

    def start(self, batch_size: int, device: torch.device) -> None:
        super().start(batch_size, device)
        self.next_logits = None  # the heads' logits at the next src_hidden, when a VerticalSource made them

    def pool(self, src_hidden, root_pos, code_pos, size, generator, logits=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B, J, size) and q (B, J, size, K) or None of the heads at ``src_hidden`` (B, d), or from their
        ``logits`` (B, n, K) when the caller already has them."""
        n = self.heads.config.num_horizontal
        if logits is None:
            logits = self.frozen.horizontal_logits(src_hidden)  # (B, n, K)
        k = code_pos - root_pos[:, None]  # (B, J) head index (1-based) drafting each position
        ok = (code_pos >= 0) & (k >= 1) & (k <= n)
        per_pos = logits.gather(1, (k.clamp(1, n) - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, J, K)
        return self._candidates(per_pos, ok, size, generator)

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        logits = self.next_logits if self.next_logits is not None else self.frozen.horizontal_logits(src_hidden)
        self.next_logits = None
        n = logits.shape[1]
        if self.draft == "sample":  # i.i.d. draws per position (the generator's draws follow the (B, J) layout)
            tokens, q = self.pool(src_hidden, root_pos, code_pos, pool_size, generator, logits)
            k = (code_pos - root_pos[:, None]).clamp(1, n) - 1  # (B, J) the head of each position
            logq = torch.log_softmax(logits.float(), -1).gather(1, k.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            return Pools(tokens, q, logq.gather(-1, tokens.clamp(min=0)) if self.scores else None)
        # top-k: each head's candidates once (B, n, P), padded with a row of none before head 1 and after head n;
        # position j takes row k = its head (k <= 0: past the image, code_pos = -1; k > n: past the heads' reach)
        top = logits.topk(pool_size, dim=-1).indices
        k = (code_pos - root_pos[:, None]).clamp(0, n + 1)  # (B, J)
        tokens = nn.functional.pad(top, (0, 0, 1, 1), value=-1)[self._bidx, k]
        if not self.scores:
            return Pools(tokens)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, top)  # what a dynamic tree ranks by
        return Pools(tokens, None, nn.functional.pad(logp, (0, 0, 1, 1))[self._bidx, k])

    def describe(self) -> dict:
        return {"kind": self.kind, "draft": self.draft,
                "num_horizontal": self.heads.config.num_horizontal if self.heads is not None else None}


class VerticalSource(HeadsSource):
    """Hawk's vertical heads and their speculation cache.

    Every accepted token's hidden state runs through the vertical heads; head d's draft for the token d rows
    below (body position ``s + d*W``) waits in the *speculation cache*, keyed by that position, until decoding
    speculates it. Candidates: the cached drafts of each position, ``vsd * m`` wide (head 1's m candidates first),
    -1 where the cache holds none.

    The cache has a slot per body position a head can target (``R = L + vsd*W + 2``: the image, the rows below
    it, a read-only slot of none last), so a step writes and reads without a test: every position is accepted
    once, so each (position, head) slot is written at most once per batch, and a step speculates only code
    positions of the image, never the forced tokens or the rows below the image that heads also reach (their
    drafts are written and never read). Padded path entries (position -1) write below the image; a speculated
    position of -1 (past the image end) reads the last slot, never written: none.

    Args:
        heads, path, draft, key, path_key: See :class:`HeadsSource` (heads with vertical heads: ``heads=hawk``).
        vsd: Vertical speculation depth used at decoding, <= the heads' (None: all of them).
        candidates: Candidates each vertical head contributes per position (m).

    Every head runs in :meth:`observe`, once per step: when a :class:`HorizontalSource` of the same proposer
    drafts with the same heads, its logits at the next ``src_hidden`` are computed in the same call and handed
    to it (it then needs no heads call of its own).
    """

    kind = "vertical"
    wants_accepted_hidden = True
    state_names = ("ring_tok", "ring_lp", "ring_q", "_heads_idx", "_rows")

    def __init__(self, heads: DraftHeads | None = None, path: str | None = None, draft: str = "topk",
                 vsd: int | None = None, candidates: int = 1, key: str | None = None, path_key: str | None = None):
        super().__init__(heads, path, draft, key, path_key)
        if candidates < 1:
            raise ValueError(f"{self.where('candidates')} must be >= 1, got {candidates}")
        if vsd is not None and vsd < 1:
            raise ValueError(f"{self.where('vsd')} must be >= 1 (or null: all vertical heads), got {vsd}")
        self.m, self.want_vsd = candidates, vsd
        if heads is not None:
            self._set_vsd()

    def _set_vsd(self) -> None:
        have = self.heads.config.num_vertical
        if not have:
            raise ValueError(f"the vertical source `{self.where()}` needs heads trained with vertical heads "
                             f"(heads=hawk); `{self.checkpoint_key}` holds heads without them")
        self.vsd = self.want_vsd or have
        if self.vsd > have:
            raise ValueError(f"{self.where('vsd')}={self.vsd} exceeds the heads' vertical depth {have}")

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        self._set_vsd()
        grid = backbone.grid
        self.W, self.L = grid.tokens_per_row, grid.length
        self.R = self.L + self.vsd * self.W + 2  # see the class docstring
        dev = self.heads.device
        self._down = torch.arange(1, self.vsd + 1, device=dev) * self.W  # (vsd,) offset of vertical head d
        self._slot_pos = torch.arange(self.R, device=dev)[:, None]  # (R, 1) the position each slot holds
        self._vcol = torch.arange(self.vsd, device=dev).view(1, 1, self.vsd)  # (1, 1, vsd) head of a write
        # (L + 1, vsd) the slot of each head's target from each body position p (p + d*W); position -1 (padded
        # path entries) reads the last row, slots L + d*W: below the image, where no position is ever read
        self._slot_of = torch.arange(self.L + 1, device=dev)[:, None] + self._down

    def link(self, owner) -> None:
        self.share = [s for s in owner.sources.values() if isinstance(s, HorizontalSource) and s.heads is self.heads]

    def start(self, batch_size: int, device: torch.device) -> None:
        super().start(batch_size, device)
        B, R, V, m = batch_size, self.R, self.vsd, self.m
        self.ring_tok = torch.full((B, R, V, m), -1, dtype=torch.long, device=device)
        self.ring_lp = torch.zeros((B, R, V, m), device=device)
        K = self.heads.num_codes
        self.ring_q = torch.zeros((B, R, V, K), device=device) if self.draft == "sample" else None
        self._ar, self._brow = self._bidx.view(B), self._bidx.view(B, 1, 1)
        self._heads_idx = self._rows = None  # the feature rows the LM head reads (_feature_rows): at the first observe
        self._generator = None

    @property
    def ring_pos(self) -> torch.Tensor:
        """(B, R, vsd) the body position of each slot's draft of each head, -1 where it holds none (a slot holds only
        its own position's)."""
        return torch.where(self.ring_tok[..., 0] >= 0, self._slot_pos, -1)

    def _feature_rows(self, A: int) -> None:
        """Which of the heads' (H, B*A, d) features the LM head reads, (B, n + A*vsd) head and row indices: the
        horizontal heads 1..n at each row's last accepted token, then the vertical heads 1..vsd at every accepted
        token. The rows depend on the accepted count c = 0..A (the last token is c - 1; none accepted: 0), so
        they are one table, (B, A + 1, n + A*vsd), looked up by count. Made at a batch's first observe (A: the
        engine's path width)."""
        n, V, dev = self.heads.config.num_horizontal, self.vsd, self._bidx.device
        B = self._bidx.shape[0]
        self._heads_idx = torch.cat([torch.arange(n, device=dev), n + torch.arange(V, device=dev).repeat(A)])[None]
        token = torch.cat([torch.zeros(n, dtype=torch.long, device=dev),
                           torch.arange(A, device=dev).repeat_interleave(V)])
        last = (torch.arange(A + 1, device=dev) - 1).clamp(min=0)[:, None] * (self._heads_idx < n)  # (A + 1, n + A*V)
        self._rows = (self._bidx[:, :, None] * A + token + last).contiguous()  # (B, A + 1, n + A*V)

    def observe(self, hidden: torch.Tensor, positions: torch.Tensor, count: torch.Tensor) -> None:
        """Fill the speculation cache from every accepted token: hidden (B, A, d), positions (B, A)."""
        n, vsd = self.heads.config.num_horizontal, self.vsd
        B, A = positions.shape
        if self._rows is None or self._rows.shape[1:] != (A + 1, n + A * vsd):
            self._feature_rows(A)
        feats = self.frozen.features_by_head(hidden)  # (H, B*A, d) every head's ResBlocks, one batched call
        # the LM-head matmul is the costly part: only the rows needed (horizontal heads at the last token,
        # vertical heads at every token), gathered in one index and scored in one call
        rows = feats[self._heads_idx, self._rows[self._ar, count]]  # (B, n + A*vsd, d)
        logits = self.frozen.code_head(rows)  # (B, n + A * vsd, K)
        for s in self.share:
            s.next_logits = logits[:, :n]  # (B, n, K)
        v_logits = logits[:, n:].view(B, A, vsd, -1)
        if self.draft == "topk":
            tokens, q = v_logits.topk(self.m, dim=-1).indices, None  # (B, A, vsd, m)
        else:  # i.i.d. draws, as HeadsSource._candidates draws them
            q = target_probs(v_logits, self.sampling)
            tokens = sample(q.unsqueeze(-2).expand(*q.shape[:-1], self.m, q.shape[-1]), self._generator)
        slot = self._slot_of[positions]  # (B, A, vsd)
        b, v = self._brow, self._vcol
        self.ring_tok[b, slot, v] = tokens
        if self.scores:
            self.ring_lp[b, slot, v] = torch.log_softmax(v_logits.float(), -1).gather(-1, tokens)  # (B, A, vsd, m)
        if q is not None:
            self.ring_q[b, slot, v] = q

    def vertical_drafts(self, code_pos: torch.Tensor) -> torch.Tensor:
        """(B, J, vsd * m) the cache's drafts for body positions ``code_pos`` (B, J), -1 where it holds none: what
        the pool merges, and what :mod:`hawkspec.analysis.acceptance` reads to tell which accepted tokens a
        vertical head drafted."""
        return self.ring_tok[self._bidx, code_pos].flatten(2)  # code_pos -1: the last slot, never written

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        self._generator = generator  # the next observe draws sampled vertical drafts with it
        tokens = self.vertical_drafts(code_pos)  # (B, J, vsd*m)
        logp = self.ring_lp[self._bidx, code_pos].flatten(2) if self.scores else None
        q = None
        if self.draft == "sample":
            B, J = code_pos.shape
            K = self.ring_q.shape[-1]
            q = self.ring_q[self._bidx, code_pos].unsqueeze(-2).expand(B, J, self.vsd, self.m, K).flatten(2, 3)
        return Pools(tokens, q, logp)

    def describe(self) -> dict:
        return {"kind": self.kind, "draft": self.draft, "vsd": getattr(self, "vsd", self.want_vsd), "candidates": self.m}


# --------------------------------------------------------------------------------------------- Jacobi, EAGLE
class JacobiSource(DraftSource):
    """The drafts Jacobi iteration gets for free from the last verification forward: every uncommitted position
    a tree node predicted, drawn from that node's output, which is kept as its q
    (:class:`~hawkspec.decoding.proposers.jacobi.JacobiDrafts`). One candidate per position, none where no node
    reached it (no random initialisation: that is :class:`~hawkspec.decoding.proposers.JacobiProposer`).

    Args:
        coupling: ``none`` (a fresh draft each time), ``maximal`` or ``gumbel`` (SCD's couplings of a position's
            carried draft with the next one, exact: :mod:`hawkspec.decoding.proposers.jacobi`).
        key: Its config node (see :class:`~hawkspec.decoding.proposers.Proposer`).
    """

    kind = "jacobi"
    wants_tree_outputs = True
    state_names = tuple(f"drafts.{n}" for n in JacobiDrafts.state_names)

    def __init__(self, coupling: str = "none", lane: int = 0, key: str | None = None):
        self.key, self.name = key, self.kind
        self.coupling = check_choice(coupling, COUPLINGS, self.where("coupling"))
        self.lane_width = check_lane(lane, self.where("lane"))

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        self.drafts = JacobiDrafts(backbone.grid, backbone.num_codes, next(iter(backbone.buffers())).device,
                                   self.coupling)
        self.W = backbone.grid.tokens_per_row
        fit_lane(self.lane_width, self.W, self.where("lane"))

    def lane(self, root_pos, codes):
        return self.drafts.lane(root_pos, codes, self.lane_width, self.W)

    def start(self, batch_size: int, device: torch.device) -> None:
        self.drafts.start(batch_size, device)

    def observe_tree(self, probs, node_pos, codes, generator, chain: bool = False) -> None:
        self.drafts.observe(probs, node_pos, codes, generator, chain)

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        tok, q = self.drafts.lookup(code_pos)  # (B, J) (-1 past the image: the spare column), (B, J, K)
        return Pools(tok.unsqueeze(-1), q.unsqueeze(2))

    def describe(self) -> dict:
        out = {"kind": self.kind, "coupling": self.coupling} if self.coupling != "none" else {"kind": self.kind}
        return {**out, "lane": self.lane_width} if self.lane_width else out


def load_checkpoint(owner, cls, path, key: str, backbone):
    """``cls.load(path, backbone, key)`` through ``owner.load`` (a composed proposer: one load per class and
    folder, shared by its sources) or directly. A missing path is a ValueError naming ``key``; a missing
    checkpoint, a FileNotFoundError naming it."""
    if owner is not None and hasattr(owner, "load"):
        return owner.load(cls, path, key, backbone)
    if not path:
        raise ValueError(f"`{key}` is not set: point it at a folder written by hawkspec-train")
    return cls.load(Path(path), backbone, key)
