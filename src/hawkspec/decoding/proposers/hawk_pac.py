"""Hawk + SJD-PAC (ours), exact: SJD-PAC's tree and adaptive continuation (:mod:`~hawkspec.decoding.proposers.pac`)
with Hawk's heads drafting where SJD-PAC guesses. BRIEF-2026 §2.5 and §6 (invariants I1-I4).

**Fresh positions** (never predicted by a forward: the tail of the main chain, and every position of the first
tree), where SJD-PAC draws K uniform codes: the K siblings are drawn without replacement from the heads' sampled
distribution q for that position (under the target's temperature / top-k, as the sources' ``draft: sample``):
the horizontal head for that depth at the last committed hidden state where one reaches it, else the speculation
cache's vertical q where a vertical head has drafted the position (the nearest row's head first), else uniform
(SJD-PAC's). One q per position (``heads`` orders the heads; horizontal first measured better), recorded as the position's q: adaptive continuation then
couples the rank-0 draft with the next forward's p_stale against it, as in SJD-PAC.

**Siblings** (``siblings_from: heads``, the default): at a carried position (one a forward has predicted) rank 0 stays
SJD-PAC's (the keep-or-resample coupling with p_stale, whose q is recorded), and ranks 1..K-1 are drawn afresh
at every step without replacement from the heads' q for that position with rank 0 excluded (Gumbel-top-(K-1),
fresh noise), where a head reaches it; elsewhere they are SJD-PAC's (without replacement from p_stale). Rank b's
pool q is the heads' q with ranks 0..b-1 zeroed and renormalised: every sibling is a draw from the q the exact
rule tests it with, given the siblings before it, which is all recursive rejection sampling needs (each stage is
a speculative-sampling step against the residual of the one before; the residual after rank b has no mass on
rank b's code, so excluding it costs nothing). p_stale (conditioned on the rejected draft at the new root's
position) and the heads (conditioned on the committed context only) err differently, so the second opinion
catches codes the stale target misses. ``siblings_from: stale``: SJD-PAC's ranks everywhere. (Not SJD-PAC's
``siblings`` option, which picks exact or as-released continuation: this proposer is always the exact one.)

**Redraft** (``redraft: h``, default 0): the first h code depths of every tree (the positions right after the
commit, where p_stale saw the rejected draft) are drafted entirely from the heads, as fresh positions, their q
recorded. Measured worse on the tiny model than keeping p_stale's rank 0 there (README "Decoding, precisely").

The heads load through the sources' ``path`` (``conf/decoder/proposer/hawk_pac.yaml``: Hawk's horizontal and
vertical sources on the decoder's ``heads_path``); the vertical source keeps its speculation cache as in Hawk
(both sources must draft ``draft: sample``, so the cache keeps each vertical q). Randomness: one (B, J, V) block
of uniforms per step, as SJD-PAC's (a position uses it either for fresh siblings or for ranks 1..K-1, never
both), plus the vertical cache's own draws; static draws, static shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hawkspec.decoding.proposers.base import Pools, Proposer, check_choice
from hawkspec.decoding.proposers.pac import PACProposer, rank_pools
from hawkspec.decoding.proposers.sources import HorizontalSource, VerticalSource
from hawkspec.decoding.proposers.spatial import load_shared
from hawkspec.decoding.sampling import target_probs, uniform

FRESH = ("heads", "uniform")
SIBLINGS = ("heads", "stale")
HEADS = ("horizontal", "vertical")


class HawkPACProposer(PACProposer):
    """SJD-PAC's drafts with Hawk's heads (see the module docstring).

    Args:
        sources: ``{name: source}``: a :class:`~hawkspec.decoding.proposers.sources.HorizontalSource` and/or a
            :class:`~hawkspec.decoding.proposers.sources.VerticalSource`, both ``draft: sample``.
        nodes, width, depth: The tree (``decoder.tree.pac``): L, K, D, as :class:`PACProposer`.
        fresh: ``heads`` (fresh positions drafted from the heads' q) or ``uniform`` (SJD-PAC's).
        siblings_from: ``heads`` (ranks 1..K-1 of carried positions from the heads' q) or ``stale`` (SJD-PAC's).
        redraft: Code depths right after the commit drafted entirely from the heads (0: none).
        heads: Which head's q a position takes when several reach it, first wins: ``[horizontal, vertical]``.
        key: Its config node.
    """

    name = kind = "hawk_pac"
    wants_accepted_hidden = True

    def __init__(self, sources: Mapping[str, Proposer], nodes: int = 64, width: int = 3, depth: int = 3,
                 fresh: str = "heads", siblings_from: str = "heads", redraft: int = 0,
                 heads: list[str] | tuple[str, ...] = HEADS, key: str | None = None):
        super().__init__(nodes, width, depth, key)
        self.fresh_from = check_choice(fresh, FRESH, self.where("fresh"))
        self.siblings_from = check_choice(siblings_from, SIBLINGS, self.where("siblings_from"))
        if isinstance(redraft, bool) or not isinstance(redraft, int) or redraft < 0:
            raise ValueError(f"{self.where('redraft')} must be an integer >= 0, got {redraft!r}")
        self.redraft = redraft
        self.heads_order = [check_choice(str(h), HEADS, self.where("heads")) for h in heads]
        if len(set(self.heads_order)) != len(self.heads_order):
            raise ValueError(f"{self.where('heads')}={self.heads_order} lists a head twice")
        self.sources: dict[str, Proposer] = {}
        for src_name, src in (sources or {}).items():
            if not isinstance(src, (HorizontalSource, VerticalSource)):
                raise TypeError(f"{self.where('sources')}.{src_name} is a {type(src).__name__}: the hawk_pac proposer "
                                "takes Hawk's HorizontalSource and VerticalSource")
            if src.draft != "sample":
                raise ValueError(f"{self.where('sources')}.{src_name}.draft must be `sample` (siblings are drawn from "
                                 f"the heads' sampled q), got {src.draft!r}")
            src.name = str(src_name)
            if src.key is None:
                src.key = self.where(f"sources.{src_name}")
            self.sources[str(src_name)] = src
        self.horizontal = next((s for s in self.sources.values() if isinstance(s, HorizontalSource)), None)
        self.vertical = next((s for s in self.sources.values() if isinstance(s, VerticalSource)), None)
        if self.horizontal is None and self.vertical is None:
            raise ValueError(f"{self.where('sources')} is empty: give Hawk's horizontal and/or vertical source")
        self._loaded: dict = {}

    # ------------------------------------------------------------------------------------------- plumbing
    def load(self, cls, path, key: str, backbone):
        """One load per class and folder, shared by the sources (as :meth:`SpatialProposer.load`)."""
        return load_shared(self._loaded, cls, path, key, backbone)

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        for s in self.sources.values():
            s.bind(backbone, sampling, self)
        for s in self.sources.values():
            s.link(self)
        for s in self.sources.values():
            if s.heads.num_codes != self.V:
                raise ValueError(f"{s.checkpoint_key}: heads over {s.heads.num_codes} codes, the backbone has {self.V}")

    def start(self, batch_size: int, device: torch.device) -> None:
        super().start(batch_size, device)
        for s in self.sources.values():
            s.start(batch_size, device)

    def state(self) -> dict[str, torch.Tensor]:
        out = super().state()
        out.update({f"{n}.{k}": t for n, s in self.sources.items() for k, t in s.state().items()})
        return out

    def set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {}
        for name, t in tensors.items():
            src, _, sub = name.partition(".")
            if sub and src in self.sources:
                self.sources[src].set_state({sub: t})
            else:
                own[name] = t
        super().set_state(own)

    def observe(self, hidden, positions, count) -> None:
        if self.vertical is not None:
            self.vertical.observe(hidden, positions, count)

    # ------------------------------------------------------------------------------------------- the heads' q
    def heads_q(self, src_hidden, root_pos, code_pos) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, J, V) the heads' sampled q for each speculated position and (B, J) whether a head reaches it."""
        B, J = code_pos.shape
        V, dev = self.V, code_pos.device
        q = torch.full((B, J, V), 1.0 / V, device=dev)
        have = torch.zeros((B, J), dtype=torch.bool, device=dev)
        for which in reversed(self.heads_order):  # the first listed is written last: it wins
            if which == "horizontal" and self.horizontal is not None:
                h = self.horizontal
                logits = h.next_logits if h.next_logits is not None else h.heads.horizontal(src_hidden)
                h.next_logits = None
                n = logits.shape[1]
                k = code_pos - root_pos[:, None]  # (B, J) the head (1-based) of each position
                ok = (code_pos >= 0) & (k >= 1) & (k <= n)
                per = logits.gather(1, (k.clamp(1, n) - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
                q = torch.where(ok[..., None], target_probs(per, self.sampling).float(), q)
                have = have | ok
            elif which == "vertical" and self.vertical is not None:
                v = self.vertical
                vslot = code_pos.clamp(min=0) % v.R
                hit = (v.ring_pos[self._bidx, vslot] == code_pos.unsqueeze(-1)) & (code_pos.unsqueeze(-1) >= 0)
                first = hit.int().argmax(-1)  # (B, J) the nearest row's head that drafted it
                vq = v.ring_q[self._bidx, vslot].gather(2, first[..., None, None].expand(-1, -1, 1, V)).squeeze(2)
                ok = hit.any(-1)
                q = torch.where(ok[..., None], vq.float(), q)
                have = have | ok
        return q, have

    # ------------------------------------------------------------------------------------------- propose
    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        B, J = code_pos.shape
        K, V, dev = self.width, self.V, code_pos.device
        if J != self.table.max_code_depth:
            tree = f"{self.where().rsplit('.proposer', 1)[0]}.tree"
            raise ValueError(f"the {self.name} proposer's tree ({self.where()} nodes/width/depth: {self.nodes}/"
                             f"{self.width}/{self.depth}) is not the engine's ({tree}, {J} code depths): set both "
                             f"from {tree}.pac")
        if self.vertical is not None:
            self.vertical._generator = generator  # its next observe draws the cached vertical drafts with it
        self._topo = self.table.lookup(root_pos)
        ok = (code_pos >= 0) & self._open[torch.where(code_pos >= 0, code_pos, self.L)]
        slot = torch.where(ok, code_pos, self.L)
        tok, q = self.tok[self._bidx, slot], self.q[self._bidx, slot]  # (B, J, K), (B, J, V)
        hq, have = self.heads_q(src_hidden, root_pos, code_pos)  # hq uniform where no head reaches
        # one block of Gumbel noise per step: a position uses it for fresh siblings or for ranks 1..K-1
        u = uniform((B, J, V), generator, dev).clamp_min(1e-30)
        noise = -(-u.log()).log()
        fresh = ok & (tok[..., 0] < 0)
        red = ok & have & (torch.arange(1, J + 1, device=dev)[None, :] <= self.redraft)
        draft_new = fresh | red
        # fresh (and redrafted) positions: K siblings without replacement from the heads' q (or uniform), recorded
        use = red | (have if self.fresh_from == "heads" else torch.zeros_like(have))
        q_new = torch.where(use[..., None], hq, torch.full_like(hq, 1.0 / V))
        g = hq.log() + noise
        vals, idx = torch.where(use[..., None], g, noise).topk(K, dim=-1)  # uniform q: top-K of the noise
        init = torch.where(vals > float("-inf"), idx, -1)
        tok = torch.where(draft_new[..., None], init, tok)
        q = torch.where(draft_new[..., None], q_new, q)
        fslot = torch.where(draft_new, code_pos, self.L)
        self.tok[self._bidx, fslot] = torch.where(draft_new[..., None], init, -1)
        self.q[self._bidx, fslot] = q
        tok = torch.where(ok[..., None], tok, -1)
        # carried positions a head reaches: ranks 1..K-1 from the heads' q without rank 0 (not recorded: drawn
        # afresh every step)
        sib = ok & ~draft_new & have & (tok[..., 0] >= 0) if self.siblings_from == "heads" else torch.zeros_like(ok)
        q_sib = torch.where(sib[..., None], hq, q)
        if K > 1 and self.siblings_from == "heads":
            gs = g.scatter(-1, tok[..., :1].clamp(min=0), float("-inf"))
            vals, idx = gs.topk(K - 1, dim=-1)
            rest = torch.where(vals > float("-inf"), idx, -1)
            tok = torch.cat([tok[..., :1], torch.where(sib[..., None], rest, tok[..., 1:])], dim=-1)
        # rank b's q: its base q (rank 0: the recorded q; ranks >= 1: the siblings' q) less ranks 0..b-1
        pool_tok, pool_q = rank_pools(tok, q, pool_size, q_rest=q_sib)
        self._pool_tok = pool_tok
        return Pools(pool_tok, pool_q)

    def describe(self) -> dict:
        return {"name": self.name, "nodes": self.nodes, "width": self.width, "depth": self.depth,
                "fresh": self.fresh_from, "siblings_from": self.siblings_from, "redraft": self.redraft,
                "heads": list(self.heads_order), "sources": {n: s.describe() for n, s in self.sources.items()}}
