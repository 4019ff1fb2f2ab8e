"""A proposer composed of draft sources, merged per position into one spatial sampling pool.

Medusa and Hawk are not special classes: Medusa is the horizontal heads alone; Hawk is the horizontal heads plus
the vertical speculation cache, merged vertical first; Hawk + Jacobi adds the carried Jacobi drafts; ``hawk_eagle``
merges the vertical cache with the EAGLE draft model. Each is config (``conf/decoder/proposer/*.yaml``), and its
settings are source keys (``proposer.sources.vertical.vsd=1,2,3``)::

    _target_: hawkspec.decoding.proposers.SpatialProposer
    name: hawk
    sources:              # in drafting order (sampled sources draw from the generator in this order)
      horizontal: {_target_: hawkspec.decoding.proposers.sources.HorizontalSource, path: ${....heads_path}}
      vertical: {_target_: hawkspec.decoding.proposers.sources.VerticalSource, path: ${....heads_path}}
    order: [vertical, horizontal]
    priority: [vertical, horizontal]

The sources are listed in :mod:`hawkspec.decoding.proposers.sources`.

**The merge.** Per speculated position, the sources' candidates are concatenated in ``priority`` order
(default: ``order``); a point-mass candidate (top-k, no q) equal to an earlier point-mass candidate is dropped
(it adds nothing), sampled candidates are i.i.d. draws and all stay; the first ``pool_size`` survivors are the
pool's *members* (sources left out of ``priority`` add theirs without competing). The members are then sorted
into the *verification order* ``order``, and the first ``pool_size`` of them are the pool: the tree gives its
first ranks (the deepest subtrees) to the candidates that come first. ``order`` lists source names, and an
item may itself be a list of names, whose candidates are interleaved (``[[vertical, horizontal]]``: v1, h1,
v2, h2, ...); a point mass offered by several sources ranks where its best offer ranks. Each member keeps
the q of the source it came from (point masses get a one-hot q when the pool mixes them with sampled drafts),
so the exact rule stays lossless for any mix, and its ``logp`` (dynamic trees rank by it; ``None`` when a
source gives none, e.g. Jacobi).

Why members and order are separate: Hawk's ``order`` ablation changes only which candidate is verified
first, never which candidates exist (``priority: [vertical, horizontal]`` for every order), and Hawk's Jacobi
drafts join that pool first (``order: [jacobi, vertical, horizontal]``) or fill what it leaves empty
(``order: [vertical, horizontal, jacobi]``) without competing (``priority`` leaves ``jacobi`` out).

Checkpoints: a source that drafts with a trained module reads its own ``path`` (the key its errors name), so a
proposer can mix two checkpoints (``hawk_eagle``: the decoder's ``heads_path`` and ``eagle_path``).

State: a source's per-batch tensors are its :meth:`~hawkspec.decoding.proposers.Proposer.state`; the proposer's
are theirs, named ``<source>.<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hawkspec.decoding.proposers.base import Pools, Proposer
from hawkspec.decoding.proposers.sources import HorizontalSource, VerticalSource
from hawkspec.decoding.sampling import one_hot

_BIG = 1 << 20  # rank stride of one order group (far above any pool width)
_NONE = 1 << 40  # the key of an empty slot


def _groups(order, names: list[str], key: str) -> list[tuple[str, ...]]:
    """``order`` (names, or lists of names to interleave) -> groups of names; every source exactly once."""
    if order is None:
        return [(n,) for n in names]
    if isinstance(order, str):
        order = [order]
    groups = [(item,) if isinstance(item, str) else tuple(str(x) for x in item) for item in order]
    flat = [n for g in groups for n in g]
    if sorted(flat) != sorted(names) or any(not g for g in groups):
        raise ValueError(f"{key}={flat} must list every source exactly once: {names}")
    return groups



def load_shared(loaded: dict, cls, path, key: str, backbone):
    """``cls.load(path, backbone, key)`` once per class and folder (memoised in ``loaded``); a missing ``path`` is a
    ValueError naming ``key``."""
    if not path:
        raise ValueError(f"`{key}` is not set: point it at a folder written by hawkspec-train")
    memo = (cls, str(Path(path)))
    if memo not in loaded:
        loaded[memo] = cls.load(Path(path), backbone, key)
    return loaded[memo]

class SpatialProposer(Proposer):
    """Candidate pools merged from several draft sources (see the module docstring).

    Args:
        sources: ``{name: source}`` (any :class:`~hawkspec.decoding.proposers.Proposer`), in the order they draft
            (sampled sources draw from the generator in this order). ``build_decoder`` builds each from its
            ``_target_``.
        order: Verification order: source names, or lists of names to interleave (None: ``sources`` order).
        priority: The sources whose candidates compete for the pool's slots, in the order they join it (None:
            every source, in ``order``); a source left out joins without competing (its candidates are members
            whatever the others offer) and the verification order alone decides which survive the pool size.
        name: The proposer's name (progress bars, error messages).
        key: Its config node (see :class:`~hawkspec.decoding.proposers.Proposer`); a source without a key of its
            own gets ``<key>.sources.<name>``.
    """

    name = kind = "spatial"

    def __init__(self, sources: Mapping[str, Proposer], order: Sequence | str | None = None,
                 priority: Sequence[str] | None = None, name: str | None = None, key: str | None = None):
        self.key = key
        if not sources:
            raise ValueError(f"{self.where('sources')} is empty: give at least one draft source")
        self.sources: dict[str, Proposer] = {}
        for src_name, src in sources.items():
            if not isinstance(src, Proposer):
                raise TypeError(f"{self.where('sources')}.{src_name} is a {type(src).__name__}, not a draft source: "
                                "give it a `_target_` from hawkspec.decoding.proposers.sources")
            src.name = str(src_name)
            if src.key is None:
                src.key = self.where(f"sources.{src_name}")
            self.sources[str(src_name)] = src
        names = list(self.sources)
        self.groups = _groups(order, names, self.where("order"))
        self.priority = [str(n) for n in priority] if priority is not None else [n for g in self.groups for n in g]
        if len(set(self.priority)) != len(self.priority) or not set(self.priority) <= set(names):
            raise ValueError(f"{self.where('priority')}={self.priority} must list sources of {names}, each at most once")
        if name:
            self.name = name
        self._loaded: dict = {}
        # the concatenation order: the competing sources first, then the others in verification order
        self._concat = self.priority + [n for g in self.groups for n in g if n not in self.priority]
        # no interleaving and the concatenation already in verification order: the members need no sort
        self._presorted = all(len(g) == 1 for g in self.groups) and self._concat == [g[0] for g in self.groups]
        self._cols: _Columns | None = None  # the merge's constants (_columns)

    # ----------------------------------------------------------------------------------------- plumbing
    @property
    def wants_accepted_hidden(self) -> bool:
        return any(s.wants_accepted_hidden for s in self.sources.values())

    @property
    def wants_tree_outputs(self) -> bool:
        return any(s.wants_tree_outputs for s in self.sources.values())

    @property
    def lane_width(self) -> int:
        return sum(s.lane_width for s in self.sources.values())

    @property
    def scores(self) -> bool:
        """Whether its pools carry ``Pools.logp``: every source's ``scores`` (see
        :class:`~hawkspec.decoding.proposers.sources.HeadsSource`); setting it sets theirs."""
        return all(getattr(s, "scores", True) for s in self.sources.values())

    @scores.setter
    def scores(self, value: bool) -> None:
        for s in self.sources.values():
            s.scores = bool(value)

    def lane(self, root_pos, codes):
        lanes = [s for s in self.sources.values() if s.lane_width]
        if len(lanes) != 1:
            raise ValueError(f"{self.where('sources')}: one source at most may run a lane, here {len(lanes)}")
        return lanes[0].lane(root_pos, codes)

    def load(self, cls, path, key: str, backbone):
        """``cls.load(path, backbone, key)``, once per class and folder: sources reading one checkpoint share it.
        A missing path is a ValueError naming ``key``; a missing checkpoint, a FileNotFoundError naming it."""
        return load_shared(self._loaded, cls, path, key, backbone)

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        for s in self.sources.values():
            s.bind(backbone, sampling, self)
        for s in self.sources.values():
            s.link(self)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": t for n, s in self.sources.items() for k, t in s.state().items()}

    def set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            src, sub = name.split(".", 1)
            self.sources[src].set_state({sub: t})

    def start(self, batch_size: int, device: torch.device) -> None:
        for s in self.sources.values():
            s.start(batch_size, device)

    def observe(self, hidden, positions, count) -> None:
        for s in self.sources.values():
            if s.wants_accepted_hidden:
                s.observe(hidden, positions, count)

    def observe_tree(self, probs, node_pos, codes, generator, chain=False) -> None:
        for s in self.sources.values():
            if s.wants_tree_outputs:
                s.observe_tree(probs, node_pos, codes, generator, chain)

    def source_of(self, cls) -> Proposer | None:
        """The first source that is a ``cls``, or None."""
        return next((s for s in self.sources.values() if isinstance(s, cls)), None)

    def vertical_drafts(self, code_pos: torch.Tensor) -> torch.Tensor:
        """The vertical source's cached drafts for ``code_pos`` (see :meth:`VerticalSource.vertical_drafts`)."""
        v = self.source_of(VerticalSource)
        if v is None:
            raise ValueError(f"the {self.name!r} proposer has no vertical source")
        return v.vertical_drafts(code_pos)

    def horizontal_candidates(self, src_hidden, root_pos, code_pos, size, generator, logits=None):
        """The horizontal source's tokens and q at ``src_hidden`` (see :meth:`HorizontalSource.pool`)."""
        h = self.source_of(HorizontalSource)
        if h is None:
            raise ValueError(f"the {self.name!r} proposer has no horizontal source")
        return h.pool(src_hidden, root_pos, code_pos, size, generator, logits)

    # ----------------------------------------------------------------------------------------- the pool
    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        cands = {n: s.propose(src_hidden, root_pos, code_pos, pool_size, generator) for n, s in self.sources.items()}
        if len(cands) == 1 and next(iter(self.sources.values())).ready_pool:
            return next(iter(cands.values()))
        return self.merge(cands, pool_size)

    def _columns(self, parts: list[Pools], size: int) -> "_Columns":
        """The merge's constants for these sources' offers (:class:`_Columns`), made when their shape is new: once
        per decoder and batch size, at the first step (eager in every execution mode: a static runner runs the
        first step of each kind eagerly), so the steps after it -- eager, compiled or replayed -- only read them."""
        tok = parts[0].tokens
        memo = (tuple(p.tokens.shape[-1] for p in parts), tuple(p.q is None for p in parts), size, tok.shape[:-1],
                tok.device)
        cols = self._cols
        if cols is None or cols.memo != memo:
            cols = self._cols = _Columns.make(memo, self._concat, self.groups, self.priority)
        return cols

    def merge(self, cands: dict[str, Pools], size: int) -> Pools:
        """The spatial pool (B, J, size) of the sources' candidates (see the module docstring).

        The candidates are concatenated after ``size`` columns of none (-1): a none equals the first, so one test
        drops both the nones and the repeated point masses, and the dropped columns come after the members in
        column order, the nones first, so the pool's slots left without a member take a none."""
        parts = [cands[n] for n in self._concat]
        cols = self._columns(parts, size)
        tok = torch.cat([cols.none, *(p.tokens for p in parts)], dim=-1)  # (B, J, size + C): competing sources first
        # a point mass equal to an earlier point mass adds nothing; sampled drafts are i.i.d. and all stay
        eq = tok.unsqueeze(-1) == tok.unsqueeze(-2)  # (B, J, size + C, size + C)
        drop = (eq & cols.pair).any(-1)
        if self._presorted:
            # every survivor's key grows with its column: the members in column order. Competing sources come
            # first, so the first `size` survivors are the first `size` competing ones whenever there are that
            # many, and the members' cut (below) changes nothing the pool keeps
            col = torch.argsort(drop, dim=-1, stable=True)[..., :size]
        else:
            # members: the first `size` competing survivors, and every survivor of a source outside `priority`
            keep = ~drop
            if cols.all_compete:
                keep &= keep.cumsum(-1) <= size
            else:
                keep &= ~cols.compete | ((keep & cols.compete).cumsum(-1) <= size)
            same = eq if cols.all_point else eq & cols.point_pair
            # a point mass ranks at its best offer
            key = torch.minimum(cols.occ, torch.where(same, cols.occ, _NONE).amin(-1))
            key = torch.where(keep, key, _NONE)
            col = torch.argsort(key, dim=-1, stable=True)[..., :size]  # (B, J, size) columns, verification order
        tokens = tok.gather(-1, col)
        q = logp = None
        if any(p.q is not None for p in parts):
            ref = next(p.q for p in parts if p.q is not None)
            K = ref.shape[-1]
            qs = [p.q if p.q is not None else one_hot(p.tokens.clamp(min=0), K, ref.dtype) for p in parts]
            none = qs[0][..., :1, :].expand(-1, -1, size, -1)  # (a none's q is never read)
            q = torch.cat([none, *qs], dim=2).gather(2, col.unsqueeze(-1).expand(-1, -1, -1, K))
        if all(p.logp is not None for p in parts):
            scores = [p.logp if p.logp.dtype == torch.float32 else p.logp.float() for p in parts]
            logp = torch.cat([cols.none_lp, *scores], dim=-1).gather(-1, col)
        return Pools(tokens, q, logp)

    def describe(self) -> dict:
        out = {"name": self.name, "sources": {n: s.describe() for n, s in self.sources.items()},
               "order": [list(g) if len(g) > 1 else g[0] for g in self.groups], "priority": list(self.priority)}
        drafts = {s.describe().get("draft") for s in self.sources.values()} - {None}
        if len(drafts) == 1:  # the decision semantics tables read it
            out["draft"] = drafts.pop()
        return out


@dataclass(frozen=True)
class _Columns:
    """The merge's constants for one shape of the sources' offers (``memo``: their widths, which of them are point
    masses, the pool size P, the (B, J) batch and the device), over its P + C columns: P columns of none, then the
    sources' in concatenation order.

    Attributes:
        none, none_lp: (B, J, P) the none columns' tokens (-1) and scores (0).
        pair: (P + C, P + C) [i, j]: an equal token at column j drops column i -- j is column 0 (a none), or an
            earlier column and both are point masses.
        point_pair: (P + C, P + C) both columns are point masses.
        compete: (P + C,) the column's source is in ``priority``.
        occ: (P + C,) the column's place in the verification order (group, then rank and source within an
            interleaved group); the nones last.
        all_point, all_compete: Every source's offers are point masses / compete.
    """

    memo: tuple
    none: torch.Tensor
    none_lp: torch.Tensor
    pair: torch.Tensor
    point_pair: torch.Tensor
    compete: torch.Tensor
    occ: torch.Tensor
    all_point: bool
    all_compete: bool

    @classmethod
    def make(cls, memo: tuple, names: list[str], groups: list[tuple[str, ...]], priority: list[str]) -> "_Columns":
        widths, points, P, (B, J), dev = memo
        where = {n: (g, i, len(grp)) for g, grp in enumerate(groups) for i, n in enumerate(grp)}
        point = torch.cat([torch.ones(P, dtype=torch.bool, device=dev)]
                          + [torch.full((w,), pt, device=dev) for pt, w in zip(points, widths)])
        compete = torch.cat([torch.zeros(P, dtype=torch.bool, device=dev)]
                            + [torch.full((w,), n in priority, device=dev) for n, w in zip(names, widths)])
        occ = torch.cat([torch.full((P,), _NONE, device=dev)]
                        + [where[n][0] * _BIG + torch.arange(w, device=dev) * where[n][2] + where[n][1]
                           for n, w in zip(names, widths)])
        n_cols = P + int(sum(widths))
        point_pair = point[:, None] & point[None, :]
        pair = torch.ones(n_cols, n_cols, dtype=torch.bool, device=dev).tril(-1) & point_pair  # [i, j]: j < i
        pair[:, 0] = True  # a none is dropped (column 0 drops itself too)
        return cls(memo=memo, none=torch.full((B, J, P), -1, dtype=torch.long, device=dev),
                   none_lp=torch.zeros((B, J, P), device=dev), pair=pair, point_pair=point_pair, compete=compete,
                   occ=occ, all_point=all(points), all_compete=all(n in priority for n in names))
