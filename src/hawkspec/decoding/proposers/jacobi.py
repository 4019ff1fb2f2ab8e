"""Speculative Jacobi decoding (SJD, Teng et al. 2024): a training-free proposer.

The tree is a chain of ``L`` speculated codes (the *window*, ``decoder.tree`` with ``max_rank: 1`` and
``budget = max_depth = L``). The draft at every position carries the distribution it was drawn from:

* a position seen for the first time is initialised at random — uniformly over the image codes
  (``init: uniform``, the paper's), or with the committed code one row above (``init: spatial``, a point
  mass; uniform where the row above is not committed yet);
* after each verification forward, every position the chain predicted and that was not committed gets a
  fresh draft drawn from that forward's output at the node before it, and that output is kept as its draft
  distribution. Nodes past the first rejection were conditioned on rejected drafts: that is Jacobi
  iteration, and it does not matter for exactness, because the draft distribution is fixed before the
  target that judges it is computed.

With the exact rule (accept with ``min(1, p(x) / q(x))``, resample the first rejection from
``norm(max(p - q, 0))``) this is lossless; with GSD's grouped rule it is GSD.

The draft distribution of a fresh random draft (``init_q``):

* ``onehot`` (official, tyshiwo1/Accelerating-T2I-AR-with-SJD ``scores_of_rand_tokens``, and GSD's code built
  on it): a point mass at the drawn code, so it is accepted with ``p(x)`` and a rejection zeroes ``p(x)``. Still
  lossless: the code is drawn independently of the target, and given the code the draft is deterministic.
* ``uniform`` (ours before): ``q = 1/K`` everywhere, accepted with ``min(1, K · p(x))`` and residual
  ``norm(max(p − 1/K, 0))``; also lossless, and it accepts more readily.

Plain-AR edges (``ar_edges``): the official Lumina-mGPT demo (``test_lumina_mgpt.py``) runs Jacobi iteration only
while the sequence is shorter than ``prompt + (H/16)^2 + H/16 - 10`` tokens, its window shrinking to end there:
counting the three image-start tokens and the last committed token, no draft reaches the last 14 body positions,
which are decoded one forward each. ``ar_edges: {head: 0, tail: 14}`` reproduces that (``backbone.tuning.sjd``
of the Lumina-mGPT configs); drafts never change what is decoded, only how many forwards it takes. Not reproduced:
the official loop sizes each window from the length before the last commit, one iteration late.

Coupling (``coupling``; SCD, "Speculative Coupled Decoding", arXiv 2510.24211, junhyukso/SCD): how a position
that already has a draft gets its next one, after a verification forward that did not commit it. Whatever the
coupling, the new draft is a sample of that forward's output p_stale and p_stale is stored as its q, so the exact
rule stays lossless; a coupling only makes the new draft *equal the old one* more often, so a draft that was
about to be accepted stays.

* ``none`` (SJD): a fresh draft y ~ p_stale, independent of the old one.
* ``maximal`` (SCD's MC): the speculative-sampling coupling of the old draft d (stored q_old) with p_stale: keep d
  with probability min(1, p_stale(d) / q_old(d)), else draw from norm(max(p_stale - q_old, 0)); that draw is
  p_stale-distributed whatever q_old is, and P(keep) = 1 - TV(q_old, p_stale) is the largest possible. The stored
  q is p_stale always: the released ``lumina1/`` and ``janus_pro/`` code keeps q_old for a kept draft, which is not
  exact (the kept token is p_stale-distributed only averaged over both branches: BRIEF-2026 §3.3; its Cosmos code,
  and ours, store p_stale). A position without an old draft gets y ~ p_stale; :class:`JacobiProposer` counts its
  random initial drafts as old drafts (as SCD's code does: their one-hot q is kept with p_stale(d)).
* ``gumbel`` (SCD's GS): y = argmax(log p_stale + G), the Gumbel noise G of a code at a position a pure function of
  (a per-batch seed, the row, the absolute body position, the code) -- a counter-based hash, nothing stored
  (:func:`gumbel_noise`) -- so a position keeps its draft whenever its p_stale barely moved. Exact: the noise of
  position j only ever draws drafts for j, none of which influenced an accept decision before j is committed (and
  then never again drafted). The released code keeps the noise in a table shifted by each commit, but not in its
  plain-AR steps, where consecutive positions reuse one noise row; keyed by position, nothing is ever reused. The
  seed is drawn from the run's generator in the first observed step of a batch (two uniforms every step, so a
  compiled step's draws stay static).

Window length: SJD's ``L = 16`` (``max_num_new_tokens``) counts the tokens of one Jacobi forward: the last
accepted token and ``L − 1 = 15`` drafts. Our chain length (``decoder.tree.budget = max_depth``) counts drafts
only, so the official ``L = 16`` is ``budget: 15`` (``conf/decoder/sjd.yaml``, ``gsd.yaml``).
"""

from __future__ import annotations

import torch

from hawkspec.decoding.proposers.base import Pools, Proposer, _earlier, check_choice
from hawkspec.decoding.sampling import one_hot, sample, uniform

INITS = ("uniform", "spatial")
INIT_QS = ("onehot", "uniform")
COUPLINGS = ("none", "maximal", "gumbel")

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding 32-bit values, with no int64 overflow (the constant is split in
    16-bit halves, every product stays below 2^49)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32, a bijection with near-ideal avalanche) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Counter-based Gumbel(0, 1) noise, float64, a pure function of its key: (..., K) for the codes 0..K-1.

    Args:
        seed: (2,) int64, two 24-bit halves of the batch's seed.
        row, pos: int64, broadcastable to each other: the row of the batch and the absolute body position.

    Two lanes of chained 32-bit hashes over (seed, row, position, code) give 53 random bits, a uniform u in
    (0, 1) and G = -log(-log u). Works eagerly, compiled and in CUDA graphs (integer ops only, no state).
    """
    key = torch.broadcast_shapes(row.shape, pos.shape)
    code = torch.arange(num_codes, device=pos.device)
    lanes = []
    for init in (0x243F6A88, 0x85A308D3):  # pi's digits: two independent lanes
        h = _mix32(seed[0] ^ init)
        h = _mix32(h ^ seed[1])
        h = _mix32(h ^ (row.expand(key) & _M32))
        h = _mix32(h ^ (pos.expand(key) & _M32))
        lanes.append(_mix32(h.unsqueeze(-1) ^ code))
    bits = (lanes[0] >> 6) * (1 << 27) + (lanes[1] >> 5)  # 26 + 27 = 53 bits
    u = (bits.double() + 0.5) / float(1 << 53)
    return -torch.log(-torch.log(u))


def check_lane(lane, key: str) -> int:
    """A lane width (spatial Jacobi's nodes of the row below per forward) >= 0, else a ValueError naming ``key``."""
    if int(lane) < 0:
        raise ValueError(f"{key} must be >= 0 (0: no lane), got {lane}")
    return int(lane)


def fit_lane(lane: int, W: int, key: str) -> None:
    """A lane must end one row below the root and start after it: at most W - 1 nodes (W tokens a row)."""
    if lane > W - 1:
        raise ValueError(f"{key}={lane}: the lane holds at most W - 1 = {W - 1} nodes on this backbone "
                         f"({W} tokens a row)")


class JacobiDrafts:
    """The carried drafts of Jacobi iteration, keyed by body position: after each verification forward, every
    position a tree node predicted and that is still uncommitted gets a fresh draft from that node's output,
    which is kept as the draft's distribution. Shared by :class:`JacobiProposer` and the
    :class:`~hawkspec.decoding.proposers.sources.JacobiSource` (which check ``coupling``).
    """

    #: The tensors kept from step to step of a batch (see :meth:`~hawkspec.decoding.proposers.Proposer.state`).
    state_names = ("tok", "q", "_bidx", "codes", "seed")

    def __init__(self, grid, num_codes: int, device, coupling: str = "none"):
        self.L, self.K, self.coupling = grid.length, num_codes, coupling
        forced = grid.forced_mask().to(device)
        self._open = torch.cat([~forced, forced.new_zeros(1)])  # a position takes drafts; index L: outside

    def start(self, batch_size: int, device: torch.device) -> None:
        # one spare column (index L) absorbs writes for positions outside the image
        self.tok = torch.full((batch_size, self.L + 1), -1, dtype=torch.long, device=device)
        self.q = torch.zeros((batch_size, self.L + 1, self.K), device=device)
        self._bidx = torch.arange(batch_size, device=device)[:, None]
        self.codes = None  # committed codes, known after the first step
        if self.coupling == "gumbel":  # the batch's noise seed: two 24-bit halves, -1 until the first step draws it
            self.seed = torch.full((2,), -1, dtype=torch.long, device=device)

    def carry(self, code_pos: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor, where: torch.Tensor) -> None:
        """Record drafts made elsewhere (a proposer's random initial drafts) as the carried drafts of their
        positions, so the ``maximal`` coupling keeps them with p_stale(d) / q(d). (B, J), (B, J), (B, J, K), (B, J)."""
        slot = torch.where(where & (code_pos >= 0), code_pos, self.L)
        self.tok.scatter_(1, slot, torch.where(slot < self.L, tokens, -1))
        self.q[self._bidx, slot] = q

    def lane(self, root_pos: torch.Tensor, codes: torch.Tensor, width: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial Jacobi's lane (:meth:`~hawkspec.decoding.proposers.Proposer.lane`): the ``width`` positions that
        end one row below the root (``root + W - width + 1 .. root + W``, minus one: each node predicts the next),
        each holding its carried draft, else the committed code one row above it, else code 0. (B, M), (B, M)."""
        M, dev = width, root_pos.device
        pos = root_pos[:, None] + (W - M) + torch.arange(M, device=dev)  # (B, M)
        inside = pos < self.L
        pos = torch.where(inside, pos, -1)
        carried = self.tok[self._bidx, torch.where(inside, pos, self.L)]
        above = pos - W
        code_above = torch.where(above >= 0, codes.gather(1, above.clamp(min=0)), -1)
        code = torch.where(carried >= 0, carried, code_above.clamp(min=0))
        forced = ~self._open[torch.where(inside, pos, self.L)] & inside
        return pos, torch.where(forced, -1, code)

    def lookup(self, code_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, J) positions (-1 none) -> carried tokens (B, J) (-1 where none) and their q (B, J, K)."""
        pos = torch.where(code_pos >= 0, code_pos, self.L)
        return self.tok[self._bidx, pos], self.q[self._bidx, pos]

    def observe(self, probs, node_pos, codes, generator, chain: bool = False) -> None:
        """See :meth:`Proposer.observe_tree`. ``chain``: the caller guarantees one node per position."""
        self.codes = codes
        T = node_pos.shape[1]
        target = node_pos + 1  # (B, T) the position each node predicts
        # open: inside the image and not forced (node_pos -1 -> target 0, excluded by node_pos >= 0)
        ok = (node_pos >= 0) & self._open[target] & (codes.gather(1, target.clamp(max=self.L - 1)) < 0)
        if not chain:  # siblings predict the same position: keep the first node's draft, so token and q agree
            ok &= ~((target.unsqueeze(-1) == target.unsqueeze(-2)) & ok.unsqueeze(1) & _earlier(T, ok.device)).any(-1)
        slot = torch.where(ok, target, self.L)
        if self.coupling == "maximal":
            new = self._maximal(probs, slot, ok, generator)
        elif self.coupling == "gumbel":
            new = self._gumbel(probs, target, generator)
        else:  # SJD: a fresh draft (the draws of this path are the ones it always made)
            new = sample(probs, generator)
        self.tok.scatter_(1, slot, torch.where(ok, new, -1))
        self.q[self._bidx, slot] = probs  # p_stale is the new draft's q, kept or not

    def _maximal(self, probs, slot, ok, generator) -> torch.Tensor:
        """The speculative-sampling (maximal) coupling of each position's old draft with p_stale (see the module
        docstring). Two uniforms per node, whatever the branch."""
        old = self.tok[self._bidx, slot]  # (B, T) the carried draft, -1 none (the spare column holds -1)
        q_old = self.q[self._bidx, slot]  # (B, T, K)
        has = ok & (old >= 0)
        d = old.clamp(min=0).unsqueeze(-1)
        p_d, q_d = probs.gather(-1, d).squeeze(-1), q_old.gather(-1, d).squeeze(-1)
        keep = has & (uniform(p_d.shape, generator, probs.device, p_d.dtype) * q_d < p_d)  # min(1, p/q)
        residual = (probs - q_old).clamp(min=0)
        use = (has & (residual.sum(-1) > 0)).unsqueeze(-1)  # a rejection leaves mass there (p(d) < q(d))
        return torch.where(keep, old, sample(torch.where(use, residual, probs), generator))

    def _gumbel(self, probs, target, generator) -> torch.Tensor:
        """Gumbel-max drafts with the noise keyed by (seed, row, position): argmax(log p_stale + G)."""
        u = uniform((2,), generator, probs.device)  # every step (static draws); kept from the first of the batch
        self.seed = torch.where(self.seed >= 0, self.seed, (u * (1 << 24)).long().clamp(max=(1 << 24) - 1))
        noise = gumbel_noise(self.seed, self._bidx, target, self.K)  # (B, T, K)
        return (probs.double().log() + noise).argmax(-1)


class JacobiProposer(Proposer):
    """Drafts carried from the previous Jacobi iteration; fresh random drafts where there are none.

    Args:
        init: How a position without a carried draft starts: ``uniform`` over the image codes (SJD) or
            ``spatial`` (the committed code one row above, else uniform).
        init_q: The draft distribution a uniformly drawn fresh draft carries: ``onehot`` (official SJD) or
            ``uniform`` (see the module docstring).
        ar_edges: ``{head: h, tail: t}``: no draft at the first ``h`` and the last ``t`` body positions, which
            are therefore decoded as plain AR (official Lumina-mGPT demo: ``tail: 14``; see the module docstring).
        coupling: How a position that already has a draft gets the next one: ``none`` (SJD: a fresh sample),
            ``maximal`` or ``gumbel`` (SCD's two couplings, exact as we store q; see the module docstring).
    """

    name = kind = "jacobi"
    wants_tree_outputs = True
    ready_pool = True
    state_names = tuple(f"drafts.{n}" for n in JacobiDrafts.state_names)

    def __init__(self, init: str = "uniform", init_q: str = "onehot", ar_edges: dict | None = None,
                 coupling: str = "none", lane: int = 0, key: str | None = None):
        self.key = key
        self.lane_width = check_lane(lane, self.where("lane"))
        edges = dict(ar_edges or {})
        unknown = set(edges) - {"head", "tail"}
        if unknown or any(int(edges.get(k, 0)) < 0 for k in ("head", "tail")):
            raise ValueError(f"{self.where('ar_edges')} must be {{head: N, tail: N}} with N >= 0, got {ar_edges!r}")
        self.head, self.tail = int(edges.get("head", 0)), int(edges.get("tail", 0))
        self.init = check_choice(init, INITS, self.where("init"))
        self.init_q = check_choice(init_q, INIT_QS, self.where("init_q"))
        self.coupling = check_choice(coupling, COUPLINGS, self.where("coupling"))

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        self.W, self.K = backbone.grid.tokens_per_row, backbone.num_codes
        self.drafts = JacobiDrafts(backbone.grid, self.K, backbone.code_token_ids.device, self.coupling)
        self.L = backbone.grid.length
        if self.head + self.tail >= self.L:
            raise ValueError(f"{self.where('ar_edges')}={{head: {self.head}, tail: {self.tail}}} leaves no body "
                             f"position of this backbone's {self.L} to draft")
        fit_lane(self.lane_width, self.W, self.where("lane"))

    def lane(self, root_pos, codes):
        return self.drafts.lane(root_pos, codes, self.lane_width, self.W)

    def start(self, batch_size: int, device: torch.device) -> None:
        self.drafts.start(batch_size, device)

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        B, J = code_pos.shape
        dev = code_pos.device
        tokens, q = self.drafts.lookup(code_pos)  # (B, J), (B, J, K)
        fresh = tokens < 0  # no carried draft yet: SJD's initialisation (drawn for every position, kept where fresh)
        init_tok = (uniform((B, J), generator, dev) * self.K).long().clamp(max=self.K - 1)
        if self.init_q == "onehot":
            init_q = one_hot(init_tok, self.K, q.dtype)
        else:
            init_q = torch.full((B, J, self.K), 1.0 / self.K, device=dev)
        codes = self.drafts.codes
        if self.init == "spatial" and codes is not None:
            bidx = torch.arange(B, device=dev)[:, None]
            above = code_pos - self.W
            code_above = torch.where(above >= 0, codes[bidx, above.clamp(min=0)], -1)
            known = code_above >= 0
            init_tok = torch.where(known, code_above, init_tok)
            init_q = torch.where(known.unsqueeze(-1), one_hot(code_above.clamp(min=0), self.K, init_q.dtype), init_q)
        tokens = torch.where(fresh, init_tok, tokens)
        q = torch.where(fresh.unsqueeze(-1), init_q, q)
        ok = (code_pos >= self.head) & (code_pos < self.L - self.tail)  # -1: outside; the edges: plain AR
        if self.coupling == "maximal":  # SCD couples the random initial drafts too: they become carried drafts
            self.drafts.carry(code_pos, tokens, q, fresh & ok)
        tokens = torch.where(ok, tokens, -1)
        # one candidate per position (the chain); further ranks are empty
        pool_tok = torch.full((B, J, pool_size), -1, dtype=torch.long, device=dev)
        pool_tok[..., 0] = tokens
        pool_q = q.new_zeros((B, J, pool_size, self.K))
        pool_q[..., 0, :] = q
        return Pools(pool_tok, pool_q)

    def observe_tree(self, probs, node_pos, codes, generator, chain=False) -> None:
        self.drafts.observe(probs, node_pos, codes, generator, chain)

    def describe(self) -> dict:
        out = {"name": self.name, "init": self.init, "init_q": self.init_q}
        if self.coupling != "none":
            out["coupling"] = self.coupling
        if self.lane_width:
            out["lane"] = self.lane_width
        return {**out, "ar_edges": {"head": self.head, "tail": self.tail}} if self.head or self.tail else out
