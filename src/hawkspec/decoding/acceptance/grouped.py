"""Grouped speculative decoding (GSD, So et al. 2025): judge a draft by the target mass of its group (lossy).

Image tokens are redundant: several codes draw nearly the same patch. GSD therefore accepts a draft ``x``
when the target likes the *group* of tokens around it, with probability

    min(1, max(p(x) / q(x), p(G(x)) / q(G(x))))     (point-mass draft: q(G) = 1, so min(1, p(G(x))))

where ``G(x)`` is built dynamically from the target at that node from ``x``'s neighbours in the target's
ranking, each kept only if ``|p(c) − p(x)| < prob_threshold`` and its input-embedding distance to ``x`` is
below ``embed_threshold`` (``null`` disables a filter; both ``null`` is the fixed-window variant). ``group: 0``
is the exact rule. On rejection the residual is the exact rule's, ``norm(max(p − q, 0))``, as in GSD.

Official semantics (junhyukso/GSD, ``scheduler/jacobi_iteration_lumina_mgpt.py``), selected by
``window: official`` and ``embed_metric: squared`` (the defaults of ``conf/decoder/acceptance/gsd.yaml``):

* the window is the slice ``[i − group, i + group)`` of the vocabulary sorted by ascending logit, ``i`` the
  draft's rank: ``group`` lower-ranked tokens, the draft and ``group − 1`` higher-ranked ones (14 for
  ``group: 7``). When fewer than ``group`` tokens rank below the draft, the official slice is empty and its
  code falls back to the exact ratio; so do we. ``window: symmetric`` (ours) takes ``group`` on each side.
* the embedding filter compares the *squared* L2 distance of the input embeddings with the threshold
  (``embed_metric: squared``; ``l2``: the plain distance, ours before).
* no floor (``floor: false``). (Lumina-specific detail not reproduced: the official code turns the embedding
  filter off when a window member's token id is above 10,000, i.e. not an image code.)

The floor at the exact ratio (``floor: true``) is ours. GSD's Theorem 1 says grouping never accepts less
often than the exact rule, ``Σ min(p, q)``. For the raw group ratio that holds when the groups partition the
vocabulary, but GSD's groups overlap (a window around each draft) and are filtered per draft, and then a
neighbour with ``q(c) >> p(c)`` can pull a draft below its own exact ratio: on peaky random distributions we
measured acceptance probabilities up to 0.018 below the exact rule's. With the floor the theorem holds for
every draft; ``floor: false`` is the raw ratio. ``tests/decoding/test_relaxed.py`` checks both.

Ties (real bf16 logits tie heavily: a few hundred distinct values in a top-2000 set): the official window is a
slice of ``sort()`` over the logits, a stable ascending sort, so tied codes stand in increasing token-id order
and the higher id ranks higher. The window here is the same slice of a stable ascending sort of the target with
ties in token-id order (``code_token_ids``; tests/decoding/test_official_rules.py works a tied case by hand).
Vectorised: one sort per row for all rows at once.
"""

from __future__ import annotations

import warnings

import torch

from hawkspec.decoding.acceptance.base import AcceptanceRule, gather1
from hawkspec.decoding.acceptance.exact import exact_try


WINDOWS = ("official", "symmetric")
EMBED_METRICS = ("squared", "l2")


class GroupedAcceptance(AcceptanceRule):
    """GSD's dynamic grouping.

    Args:
        group: Lower-ranked neighbours of the draft in the target's ordering (official code: 7); the
            higher-ranked ones are ``group − 1`` (``window: official``) or ``group`` (``symmetric``).
        prob_threshold: Keep a neighbour only if ``|p(c) − p(x)|`` is below this (official: 0.15); None: off.
        embed_threshold: Keep a neighbour only if the distance of its input embedding to the draft's is
            below this (official, for Lumina-mGPT's embeddings: 0.5); None: off. The scale is the backbone's.
        floor: Never accept a draft less readily than the exact rule would (see the module docstring; ours).
        window: ``official`` (asymmetric slice, exact ratio at the bottom of the ranking) or ``symmetric``.
        embed_metric: ``squared`` (official) or ``l2`` distance for the embedding filter.
    """

    name = "gsd"
    lossless = False

    def __init__(
        self, group: int = 7, prob_threshold: float | None = 0.15, embed_threshold: float | None = 0.5,
        floor: bool = True, window: str = "symmetric", embed_metric: str = "l2",
    ):
        if group < 0:
            raise ValueError(f"decoder.acceptance.group must be >= 0, got {group}")
        if window not in WINDOWS:
            raise ValueError(f"decoder.acceptance.window must be one of {WINDOWS}, got {window!r}")
        if embed_metric not in EMBED_METRICS:
            raise ValueError(f"decoder.acceptance.embed_metric must be one of {EMBED_METRICS}, got {embed_metric!r}")
        self.group, self.prob_threshold, self.embed_threshold = int(group), prob_threshold, embed_threshold
        self.floor, self.window, self.embed_metric = floor, window, embed_metric
        self.emb = None
        self.embed_keep_fraction: float | None = None  # set by bind(): pairs the embedding filter keeps
        self.token_order = None  # (K,) the token id of each code (ties; set by bind()); None: the code index

    def bind(self, backbone) -> None:
        ids = getattr(backbone, "code_token_ids", None)
        self.token_order = None if ids is None else ids.detach().long()
        if self.embed_threshold is not None:
            self.emb = backbone.code_embeddings().float()
            self.embed_keep_fraction = self.pair_keep_fraction(self.emb)
            if self.embed_keep_fraction < 0.01:
                warnings.warn(
                    f"decoder.acceptance.embed_threshold={self.embed_threshold} ({self.embed_metric}) keeps "
                    f"{self.embed_keep_fraction:.2%} of the backbone's code pairs, so GSD's grouping almost never "
                    "applies and it decides like the exact rule; the threshold is on the backbone's own "
                    "input-embedding scale: retune it (conf/decoder/gsd.yaml says how)", stacklevel=2)

    def pair_keep_fraction(self, emb: torch.Tensor, max_codes: int = 2048) -> float:
        """The fraction of distinct code pairs whose embedding distance passes the filter (a subsample of
        ``max_codes`` codes on big codebooks): how much room the threshold leaves on this backbone's scale."""
        if emb.shape[0] > max_codes:
            emb = emb[torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))[:max_codes]]
        d = torch.cdist(emb, emb)
        d = d.square() if self.embed_metric == "squared" else d
        off = ~torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
        return (d[off] < self.embed_threshold).float().mean().item()

    def members(self, r: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The group of each draft: members (M, G + G_up) (x itself excluded) and whether each one is kept.

        The ranking is the official one: a stable ascending sort of the target, so that tied codes stand in
        increasing token-id order (:attr:`token_order`; the higher id ranks higher). ``window: official``: rows
        with fewer than ``group`` lower-ranked tokens keep no member (exact ratio).
        """
        M, K = r.shape
        G = min(self.group, K - 1)
        G_up = max(G - 1, 0) if self.window == "official" else G
        order = self.ascending(r)  # (M, K) codes, least likely first
        rank = (order == x.unsqueeze(-1)).to(torch.int8).argmax(-1, keepdim=True)  # (M, 1) the draft's place
        offsets = torch.cat([torch.arange(-G, 0, device=r.device), torch.arange(1, G_up + 1, device=r.device)])
        at = rank + offsets  # (M, G + G_up) places of the window, the draft's own excluded
        members = order.gather(-1, at.clamp(0, K - 1))
        keep = (at >= 0) & (at < K)
        if self.window == "official":  # the official slice [i - G, i + G) is empty near the bottom
            keep &= rank >= G
        rx = gather1(r, x).unsqueeze(-1)
        if self.prob_threshold is not None:
            keep &= (r.gather(-1, members) - rx).abs() < self.prob_threshold
        if self.emb is not None:
            dist = (self.emb[members] - self.emb[x].unsqueeze(1)).square().sum(-1)
            dist = dist if self.embed_metric == "squared" else dist.sqrt()
            keep &= dist < self.embed_threshold
        return members, keep

    def ascending(self, r: torch.Tensor) -> torch.Tensor:
        """(M, K) -> the codes of each row by ascending target, ties in increasing token-id order.

        The official window is a slice of ``logits.sort()``: over Lumina-mGPT's 65,536-entry vocabulary CUDA sorts
        with a stable radix sort (and the CPU sort is stable), so equal logits keep their token-id order. Ranking
        the target probabilities instead of the logits is the same order: softmax is monotone and maps equal
        logits to equal probabilities. (The official sort also runs over the non-image ids, which tie with the
        masked codes at -inf at the very bottom; ours ranks the image codes only.)
        """
        if self.by_id is None:
            return torch.sort(r, dim=-1, stable=True).indices
        by_id = self.by_id.to(r.device)
        return by_id[torch.sort(r[:, by_id], dim=-1, stable=True).indices]

    @property
    def token_order(self) -> torch.Tensor | None:
        """(K,) the token id of each code, which orders tied codes; None: the code index. Setting it keeps its
        argsort (:attr:`by_id`), so the hot path sorts by it without re-deriving it every step."""
        return self._token_order

    @token_order.setter
    def token_order(self, ids: torch.Tensor | None) -> None:
        self._token_order = ids
        self.by_id = None if ids is None else torch.argsort(ids)

    def accept_mass(self, r: torch.Tensor, x: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """What stands for r(x) in the exact test so that acceptance is min(1, [max(p(x)/q(x),] p(G)/q(G)))."""
        rx = gather1(r, x)
        if self.group == 0:
            return rx
        members, keep = self.members(r, x)
        p_group = rx + (r.gather(-1, members) * keep).sum(-1)
        if q is None:
            return p_group
        qx = gather1(q, x)
        q_group = qx + (q.gather(-1, members) * keep).sum(-1)
        mass = qx * p_group / q_group.clamp_min(1e-30)
        return torch.maximum(mass, rx) if self.floor else mass

    def try_candidate(self, r, x, q, u):
        return exact_try(r, x, q, u, self.accept_mass(r, x, q))

    def describe(self) -> dict:
        return {"name": self.name, "lossless": False, "group": self.group,
                "prob_threshold": self.prob_threshold, "embed_threshold": self.embed_threshold, "floor": self.floor,
                "window": self.window, "embed_metric": self.embed_metric,
                "embed_keep_fraction": None if self.embed_keep_fraction is None else round(self.embed_keep_fraction, 3)}
