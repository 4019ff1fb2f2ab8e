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

Window length: SJD's ``L = 16`` (``max_num_new_tokens``) counts the tokens of one Jacobi forward: the last
accepted token and ``L − 1 = 15`` drafts. Our chain length (``decoder.tree.budget = max_depth``) counts drafts
only, so the official ``L = 16`` is ``budget: 15`` (``conf/decoder/sjd.yaml``, ``gsd.yaml``).
"""

from __future__ import annotations

import torch

from hawkspec.decoding.proposers.base import Pools, Proposer, _earlier
from hawkspec.decoding.sampling import one_hot, sample, uniform

INITS = ("uniform", "spatial")
INIT_QS = ("onehot", "uniform")


class JacobiDrafts:
    """The carried drafts of Jacobi iteration, keyed by body position: after each verification forward, every
    position a tree node predicted and that is still uncommitted gets a fresh draft from that node's output,
    which is kept as the draft's distribution. Shared by :class:`JacobiProposer` and Hawk's ``jacobi`` pool.
    """

    def __init__(self, grid, num_codes: int, device):
        self.L, self.K = grid.length, num_codes
        forced = grid.forced_mask().to(device)
        self._open = torch.cat([~forced, forced.new_zeros(1)])  # a position takes drafts; index L: outside

    def start(self, batch_size: int, device: torch.device) -> None:
        # one spare column (index L) absorbs writes for positions outside the image
        self.tok = torch.full((batch_size, self.L + 1), -1, dtype=torch.long, device=device)
        self.q = torch.zeros((batch_size, self.L + 1, self.K), device=device)
        self._bidx = torch.arange(batch_size, device=device)[:, None]
        self.codes = None  # committed codes, known after the first step

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
        self.tok.scatter_(1, slot, torch.where(ok, sample(probs, generator), -1))
        self.q[self._bidx, slot] = probs


class JacobiProposer(Proposer):
    """Drafts carried from the previous Jacobi iteration; fresh random drafts where there are none.

    Args:
        init: How a position without a carried draft starts: ``uniform`` over the image codes (SJD) or
            ``spatial`` (the committed code one row above, else uniform).
        init_q: The draft distribution a uniformly drawn fresh draft carries: ``onehot`` (official SJD) or
            ``uniform`` (see the module docstring).
        ar_edges: ``{head: h, tail: t}``: no draft at the first ``h`` and the last ``t`` body positions, which
            are therefore decoded as plain AR (official Lumina-mGPT demo: ``tail: 14``; see the module docstring).
    """

    name = "jacobi"
    wants_tree_outputs = True

    def __init__(self, init: str = "uniform", init_q: str = "onehot", ar_edges: dict | None = None):
        edges = dict(ar_edges or {})
        unknown = set(edges) - {"head", "tail"}
        if unknown or any(int(edges.get(k, 0)) < 0 for k in ("head", "tail")):
            raise ValueError(f"decoder.proposer.ar_edges must be {{head: N, tail: N}} with N >= 0, got {ar_edges!r}")
        self.head, self.tail = int(edges.get("head", 0)), int(edges.get("tail", 0))
        if init not in INITS:
            raise ValueError(f"decoder.proposer.init must be one of {INITS}, got {init!r}")
        if init_q not in INIT_QS:
            raise ValueError(f"decoder.proposer.init_q must be one of {INIT_QS}, got {init_q!r}")
        self.init, self.init_q = init, init_q

    def bind(self, backbone, sampling) -> None:
        super().bind(backbone, sampling)
        self.W, self.K = backbone.grid.tokens_per_row, backbone.num_codes
        self.drafts = JacobiDrafts(backbone.grid, self.K, backbone.code_token_ids.device)
        self.L = backbone.grid.length
        if self.head + self.tail >= self.L:
            raise ValueError(f"decoder.proposer.ar_edges={{head: {self.head}, tail: {self.tail}}} leaves no body "
                             f"position of this backbone's {self.L} to draft")

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
        return {**out, "ar_edges": {"head": self.head, "tail": self.tail}} if self.head or self.tail else out
