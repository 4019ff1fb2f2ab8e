"""Proposers: where the draft candidates of each speculated position come from.

The engine asks a proposer for a *pool* of candidates per speculated code (code depth ``j`` = the ``j``-th
image code after the root, end-of-line tokens skipped) and, after verification, tells it which tokens were
accepted with their hidden states, so proposers with memory (Hawk's vertical speculation cache) can update, and
hands the tree's (and the lane's) target distributions to those that draft from them (Jacobi).

Every proposer and draft source is built from its config node's ``_target_`` (``conf/decoder/proposer/*.yaml``,
through :func:`hawkspec.decoding.proposers.config.build_proposer`), never looked up by name: :attr:`Proposer.name`
only labels it.
"""

from __future__ import annotations

import abc
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


def _earlier(C: int, device: torch.device) -> torch.Tensor:
    """The (C, C) mask [i, j]: j < i (two small ops, the same eager and traced)."""
    ar = torch.arange(C, device=device)
    return ar[None, :] < ar[:, None]


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


DRAFTS = ("topk", "sample")
"""How a trained drafter (heads, the EAGLE draft model) turns its distribution into candidates: ``topk``
(deterministic, point masses) or ``sample`` (i.i.d. draws, each carrying its q). The one list every proposer and
source checks (:func:`check_choice`), and ``hawkspec.cli.validate`` reads."""

DEFAULT_KEY = "decoder.proposer"
"""The config key a proposer built in Python (no config node) names in its errors."""


def check_choice(value, allowed: tuple, key: str):
    """``value`` if it is one of ``allowed``, else a ValueError naming ``key`` (the config key that sets it)."""
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
    return value


def _owner_of(obj, path: str):
    """The object holding the dotted attribute ``path`` of ``obj``, and the attribute's last name."""
    *parts, last = path.split(".")
    for part in parts:
        obj = getattr(obj, part, None)
    return obj, last


class Proposer(abc.ABC):
    """The one protocol of everything that drafts: a proposer the engine drives, and a draft source a
    :class:`~hawkspec.decoding.proposers.SpatialProposer` is composed of (``DraftSource`` is this class). The
    engine calls :meth:`bind`, then per batch :meth:`start`, per step :meth:`propose`, :meth:`observe_tree` and
    :meth:`observe`; a composed proposer calls the same methods of its sources.

    Attributes:
        name: What it is called: the proposer's name (progress bars), a source's key in ``sources``.
        kind: What drafts (``horizontal``, ``vertical``, ``jacobi``, ``eagle``, ...): a source's description.
        key: Its config node (``eval.decoders.hawk.proposer``, ``....proposer.sources.vertical``), named by its
            errors; None: :data:`DEFAULT_KEY` (built in Python). ``build_decoder`` and the composing proposer set it.
        path_key: The config key of its checkpoint (``eval.decoders.hawk.heads_path`` when ``path`` interpolates
            it), named by every loading error; None: ``<key>.path``.
    """

    name: str = ""
    kind: str = ""
    key: str | None = None
    path_key: str | None = None
    #: Set by proposers that read the accepted tokens' hidden states (Hawk's vertical heads): the engine then
    #: gathers them and calls :meth:`observe` after every step. Others skip that work.
    wants_accepted_hidden: bool = False
    #: Set by proposers that draft from the verification outputs themselves (Jacobi): the engine then calls
    #: :meth:`observe_tree` after every step. Others skip that call.
    wants_tree_outputs: bool = False
    #: Its pools are already compact and ``pool_size`` wide (a composed proposer of this source alone returns
    #: them as they are).
    ready_pool: bool = False
    #: Rows in flight (spatial Jacobi): nodes of the row below that every verification forward also runs, after the
    #: tree (:meth:`lane`); their outputs reach :meth:`observe_tree` after the tree's. 0: none.
    lane_width: int = 0
    scores: bool = True
    """Whether its pools carry ``Pools.logp`` (the drafts' scores, which only a dynamic tree reads): the engine
    sets it False when its tree is static, and proposers that can skip computing them do."""

    def where(self, sub: str = "") -> str:
        """The config key ``<key>.<sub>`` (``<key>`` when ``sub`` is empty)."""
        key = self.key or DEFAULT_KEY
        return f"{key}.{sub}" if sub else key

    @property
    def checkpoint_key(self) -> str:
        """The config key of its checkpoint (see :attr:`path_key`)."""
        return self.path_key or self.where("path")

    def bind(self, backbone, sampling, owner=None) -> None:
        """Attach to a backbone and the target's sampling settings (drafts use the same top-k/temperature), and
        load what it drafts with. ``owner``: the composed proposer it is a source of (sources reading one
        checkpoint share it through :meth:`SpatialProposer.load`), None when the engine drives it alone."""
        self.backbone, self.sampling = backbone, sampling

    def link(self, owner) -> None:
        """Called once every source of the composed proposer ``owner`` is bound (a source may work with a sibling)."""

    def start(self, batch_size: int, device: torch.device) -> None:
        """Reset per-batch state before a new batch of images (everything :meth:`state` names)."""

    @abc.abstractmethod
    def propose(
        self, src_hidden: torch.Tensor, root_pos: torch.Tensor, code_pos: torch.Tensor, pool_size: int,
        generator: torch.Generator | None,
    ) -> Pools:
        """Candidate pools for the next tree: (B, J, P) tokens, -1 where there is none. A source inside a composed
        proposer may return any width; the proposer merges them into pools of ``pool_size``.

        Args:
            src_hidden: (B, d) hidden state at the last forwarded committed token (body position root - 1).
            root_pos: (B,) body position of the root (the committed, not yet forwarded token).
            code_pos: (B, J) body position of each speculated code, -1 past the image end.
            pool_size: P, candidates wanted per position.
            generator: For sampled drafts.
        """

    def observe(self, hidden: torch.Tensor, positions: torch.Tensor, count: torch.Tensor) -> None:
        """Accepted tokens of the last step: hidden (B, A, d) at body positions (B, A), the first ``count`` of
        each row (positions are -1 past them). The last of them is the next step's ``src_hidden``. Called only
        when :attr:`wants_accepted_hidden` is true."""

    def observe_tree(
        self, probs: torch.Tensor, node_pos: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | None,
        chain: bool = False,
    ) -> None:
        """Every tree node's target distribution of the last step, for proposers that draft from them. Called
        before :meth:`observe`, only when :attr:`wants_tree_outputs` is true.

        Args:
            probs: (B, T, K) the target at every node; node ``i`` predicts body position ``node_pos[:, i] + 1``.
            node_pos: (B, T) body position of each node, -1 for nodes that were not in the tree.
            codes: (B, L) the committed codes after this step, -1 where not committed (or forced).
            generator: For drafts drawn from ``probs``.
            chain: The tree is a chain (at most one node per position), so no two nodes predict one position.
        """

    def lane(self, root_pos: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lane of the next forward (``lane_width`` > 0): (B, M) body positions, -1 for none, and (B, M) their
        codes, -1 at a forced position. Lane node ``i`` sees the committed tokens, the root and lane nodes before it
        -- never the tree's unverified drafts (PJD's row-causal rule) -- and predicts position ``pos + 1``.

        Args:
            root_pos: (B,) the root's body position.
            codes: (B, L) the committed codes, -1 where not committed (or forced).
        """
        raise TypeError(f"{type(self).__name__} has no lane (lane_width = 0)")

    #: The attributes (dotted paths below it) holding the tensors it keeps from step to step of a batch: what
    #: :meth:`state` returns by default. Tensors made once at :meth:`bind` never move and are not listed.
    state_names: tuple[str, ...] = ()

    def state(self) -> dict[str, torch.Tensor]:
        """The per-batch tensors it keeps between steps, by name: what a recorded decoding step
        (:mod:`hawkspec.decoding.static`) reads and writes, so their memory must stay put from step to step and
        batch to batch. Names absent or None (not made yet) are left out."""
        out = {}
        for name in self.state_names:
            owner, last = _owner_of(self, name)
            value = getattr(owner, last, None)
            if isinstance(value, torch.Tensor):
                out[name] = value
        return out

    def set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Point the named state (as :meth:`state` names it) at ``tensors``."""
        for name, t in tensors.items():
            owner, last = _owner_of(self, name)
            setattr(owner, last, t)

    def describe(self) -> dict:
        return {"name": self.name}
