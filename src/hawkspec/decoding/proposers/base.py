"""Proposers: where the draft candidates of each speculated position come from.

The engine asks a proposer for a *pool* of candidates per speculated code (code depth ``j`` = the ``j``-th
image code after the root, end-of-line tokens skipped) and, after verification, tells it which tokens were
accepted with their hidden states, so proposers with memory (Hawk's vertical speculation cache) can update.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass

import torch


@dataclass
class Pools:
    """Candidate pools of a batch.

    Attributes:
        tokens: (B, J, P) code indices, best first; -1 where there is no candidate.
        q: (B, J, P, K) distribution each candidate was sampled from, or None when every candidate was chosen
            deterministically (top-k): point masses for the acceptance rule.
        logp: (B, J, P) the drafter's log-probability of each candidate, or None; what a dynamic tree
            (``decoder.tree.dynamic``) ranks nodes by. Scores only: never used to accept anything.
    """

    tokens: torch.Tensor
    q: torch.Tensor | None = None
    logp: torch.Tensor | None = None


@functools.lru_cache(maxsize=32)
def _lower_mask(C: int, device: torch.device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1)


def _earlier(C: int, device: torch.device) -> torch.Tensor:
    """The (C, C) mask [i, j]: j < i. Cached in eager mode; a compiled step builds it as a constant instead of
    tracing through the cache (which dynamo warns about)."""
    return (_lower_mask.__wrapped__ if torch.compiler.is_compiling() else _lower_mask)(C, device)


def dedupe_first(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Keep the first occurrence of each candidate, in order, then truncate/pad to ``size``.

    tokens: (..., C) with -1 for none -> (..., size).
    """
    C = tokens.shape[-1]
    earlier = _earlier(C, tokens.device)  # [i, j]: j < i
    dup = ((tokens.unsqueeze(-1) == tokens.unsqueeze(-2)) & earlier).any(-1)
    keep = ~dup & (tokens >= 0)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    out = torch.where(keep, tokens, -1).gather(-1, order)
    if C < size:
        out = torch.cat([out, out.new_full((*out.shape[:-1], size - C), -1)], dim=-1)
    return out[..., :size]


class Proposer(abc.ABC):
    """Base class. ``name`` is the registry key (``decoder.proposer.name``)."""

    name: str = ""

    def bind(self, backbone, sampling) -> None:
        """Attach to a backbone and the target's sampling settings (drafts use the same top-k/temperature)."""
        self.backbone, self.sampling = backbone, sampling

    def start(self, batch_size: int, device: torch.device) -> None:
        """Reset per-batch state before a new batch of images."""

    @abc.abstractmethod
    def propose(
        self, src_hidden: torch.Tensor, root_pos: torch.Tensor, code_pos: torch.Tensor, pool_size: int,
        generator: torch.Generator | None,
    ) -> Pools:
        """Candidate pools for the next tree.

        Args:
            src_hidden: (B, d) hidden state at the last forwarded committed token (body position root - 1).
            root_pos: (B,) body position of the root (the committed, not yet forwarded token).
            code_pos: (B, J) body position of each speculated code, -1 past the image end.
            pool_size: P, candidates wanted per position.
            generator: For sampled drafts.
        """

    #: Set by proposers that read the accepted tokens' hidden states (Hawk's vertical heads): the engine then
    #: gathers them and calls :meth:`observe` after every step. Others skip that work.
    wants_accepted_hidden: bool = False

    def observe(self, hidden: torch.Tensor, positions: torch.Tensor, count: torch.Tensor) -> None:
        """Accepted tokens of the last step: hidden (B, A, d) at body positions (B, A), the first ``count`` of
        each row (positions are -1 past them). The last of them is the next step's ``src_hidden``. Called only
        when :attr:`wants_accepted_hidden` is true."""

    #: Set by proposers that draft from the verification outputs themselves (Jacobi): the engine then calls
    #: :meth:`observe_tree` after every step. Others skip that call.
    wants_tree_outputs: bool = False

    def observe_tree(
        self, probs: torch.Tensor, node_pos: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | None,
        chain: bool = False,
    ) -> None:
        """Every tree node's target distribution of the last step, for proposers that draft from them.

        Args:
            probs: (B, T, K) the target at every node; node ``i`` predicts body position ``node_pos[:, i] + 1``.
            node_pos: (B, T) body position of each node, -1 for nodes that were not in the tree.
            codes: (B, L) the committed codes after this step, -1 where not committed (or forced).
            generator: For drafts drawn from ``probs``.
            chain: The tree is a chain (at most one node per position), so no two nodes predict one position.
        """

    def describe(self) -> dict:
        return {"name": self.name}
