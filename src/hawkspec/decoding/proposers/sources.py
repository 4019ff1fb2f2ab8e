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
    """

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
        self.next_logits = None  # the heads' logits at the next src_hidden, when a VerticalSource made them

    def pool(self, src_hidden, root_pos, code_pos, size, generator, logits=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B, J, size) and q (B, J, size, K) or None of the heads at ``src_hidden`` (B, d), or from their
        ``logits`` (B, n, K) when the caller already has them."""
        n = self.heads.config.num_horizontal
        if logits is None:
            logits = self.heads.horizontal(src_hidden)  # (B, n, K)
        k = code_pos - root_pos[:, None]  # (B, J) head index (1-based) drafting each position
        ok = (code_pos >= 0) & (k >= 1) & (k <= n)
        per_pos = logits.gather(1, (k.clamp(1, n) - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, J, K)
        return self._candidates(per_pos, ok, size, generator)

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        logits = self.next_logits if self.next_logits is not None else self.heads.horizontal(src_hidden)
        self.next_logits = None
        tokens, q = self.pool(src_hidden, root_pos, code_pos, pool_size, generator, logits)
        n = logits.shape[1]
        k = (code_pos - root_pos[:, None]).clamp(1, n) - 1  # (B, J) the head of each position
        logq = torch.log_softmax(logits.float(), -1).gather(1, k.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        logp = logq.gather(-1, tokens.clamp(min=0))  # (B, J, P) what a dynamic tree ranks by
        return Pools(tokens, q, logp)

    def describe(self) -> dict:
        return {"kind": self.kind, "draft": self.draft,
                "num_horizontal": self.heads.config.num_horizontal if self.heads is not None else None}


class VerticalSource(HeadsSource):
    """Hawk's vertical heads and their speculation cache.

    Every accepted token's hidden state runs through the vertical heads; head d's draft for the token d rows
    below (body position ``s + d*W``) waits in the *speculation cache*, keyed by that position, until decoding
    speculates it. The cache is a ring buffer over ``(vsd + 1) * W`` positions: a target is never more than
    ``vsd * W`` ahead of the committed text. Candidates: the cached drafts of each position, ``vsd * m`` wide
    (head 1's m candidates first), -1 where the cache holds none.

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
    state_names = ("ring_tok", "ring_pos", "ring_lp", "ring_q", "_ar", "_brow", "_vcol")

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
        self.W = grid.tokens_per_row
        self.R = (self.vsd + 1) * self.W
        dev = self.heads.device
        self._down = torch.arange(1, self.vsd + 1, device=dev) * self.W  # (vsd,) offset of vertical head d
        # a target is cached iff it lies in the image and is not a forced token: one lookup, any target
        forced = grid.forced_mask().to(dev)
        self._cacheable = torch.cat([~forced, forced.new_zeros(self.vsd * self.W + 1)])

    def link(self, owner) -> None:
        self.share = [s for s in owner.sources.values() if isinstance(s, HorizontalSource) and s.heads is self.heads]

    def start(self, batch_size: int, device: torch.device) -> None:
        B, R, V, m = batch_size, self.R, self.vsd, self.m
        # one extra slot (index R) absorbs the writes of invalid targets, so filling needs no nonzero()
        self.ring_tok = torch.full((B, R + 1, V, m), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((B, R + 1, V), -1, dtype=torch.long, device=device)
        self.ring_lp = torch.zeros((B, R + 1, V, m), device=device)
        K = self.heads.num_codes
        self.ring_q = torch.zeros((B, R + 1, V, K), device=device) if self.draft == "sample" else None
        self._ar = torch.arange(B, device=device)
        self._brow, self._vcol = self._ar.view(B, 1, 1), torch.arange(V, device=device).view(1, 1, V)
        self._generator = None

    def observe(self, hidden: torch.Tensor, positions: torch.Tensor, count: torch.Tensor) -> None:
        """Fill the speculation cache from every accepted token: hidden (B, A, d), positions (B, A)."""
        n, vsd = self.heads.config.num_horizontal, self.vsd
        B, A = positions.shape
        feats = self.heads.features(hidden)  # (B, A, n + V, d) every head's ResBlocks, one batched call
        last = (count - 1).clamp(min=0)
        # the LM-head matmul is the costly part: only the rows needed (horizontal heads at the last token,
        # vertical heads at every token), in one call
        rows = torch.cat([feats[self._ar, last, :n], feats[:, :, n : n + vsd].flatten(1, 2)], dim=1)
        logits = self.heads.code_head(rows)  # (B, n + A * vsd, K)
        for s in self.share:
            s.next_logits = logits[:, :n]  # (B, n, K)
        target = positions.unsqueeze(-1) + self._down  # (B, A, vsd)
        ok = (positions >= 0).unsqueeze(-1) & self._cacheable[target.clamp(min=0)]
        v_logits = logits[:, n:].view(B, A, vsd, -1)
        tokens, q = self._candidates(v_logits, ok, self.m, None if self.draft == "topk" else self._generator)
        lp = torch.log_softmax(v_logits.float(), -1).gather(-1, tokens.clamp(min=0))  # (B, A, vsd, m)
        slot = torch.where(ok, target % self.R, self.R)  # (B, A, vsd); invalid -> the spare slot
        b, v = self._brow, self._vcol
        self.ring_tok[b, slot, v] = tokens
        self.ring_pos[b, slot, v] = torch.where(ok, target, -1)
        self.ring_lp[b, slot, v] = lp
        if q is not None:
            self.ring_q[b, slot, v] = q[..., 0, :]

    def vertical_drafts(self, code_pos: torch.Tensor, slot: torch.Tensor | None = None,
                        bidx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, J, vsd * m) the cache's drafts for body positions ``code_pos`` (B, J), -1 where it holds none: what
        the pool merges, and what :mod:`hawkspec.analysis.acceptance` reads to tell which accepted tokens a
        vertical head drafted."""
        if slot is None:
            slot = code_pos.clamp(min=0) % self.R
            bidx = torch.arange(code_pos.shape[0], device=code_pos.device)[:, None]
        hit = (self.ring_pos[bidx, slot] == code_pos.unsqueeze(-1)) & (code_pos.unsqueeze(-1) >= 0)  # (B, J, vsd)
        return torch.where(hit.unsqueeze(-1), self.ring_tok[bidx, slot], -1).flatten(2)

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        self._generator = generator  # the next observe draws sampled vertical drafts with it
        B, J = code_pos.shape
        slot = code_pos.clamp(min=0) % self.R  # (B, J)
        bidx = torch.arange(B, device=code_pos.device)[:, None]
        tokens = self.vertical_drafts(code_pos, slot, bidx)  # (B, J, vsd*m)
        logp = self.ring_lp[bidx, slot].flatten(2)
        q = None
        if self.draft == "sample":
            K = self.ring_q.shape[-1]
            q = self.ring_q[bidx, slot].unsqueeze(-2).expand(B, J, self.vsd, self.m, K).flatten(2, 3)
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
