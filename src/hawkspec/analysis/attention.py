"""Attention by spatial offset (the Hawk paper's Figure 1): how much a token attends to the tokens of its own
row versus the rows above, drawn as a 2-D map around the current token.

The backbone's :meth:`~hawkspec.backbones.base.Backbone.attention_maps` gives, teacher-forced over an image
body, the attention of every body query over every slot of its sequence (left padding, prompt, image-start
sequence, body). Body slots map to (row, col) through the backbone's :class:`~hawkspec.backbones.base.ImageGrid`
(col ``cols`` is the end-of-line token where the model has one). Relative to an *anchor* at (r, c), a key code
at (r', c') sits at offset (r' - r, c' - c); the map holds, per offset, the attention weight a query pays to
the key at that offset, averaged over every (image, query) pair where that key exists and is visible, and
over layers and heads.

Anchors (``anchor``):

* ``"next"`` (default): the token being generated. Query ``j`` reads token ``j`` and predicts ``j + 1``, so the
  anchor is ``j + 1``: offset (0, -1) is the previous token, (-1, 0) the token straight above the one being
  generated. Queries whose next token is forced (end-of-line) are left out. Offset (0, 0) is never visible.
* ``"query"``: the token just read (offset (0, 0) is attention to itself). Queries at end-of-line tokens are
  left out.

Slots off the image grid are not in the map; their share of the attention mass is reported separately
(:attr:`OffsetAttention.shares`): ``prompt``, ``image_start``, ``eol`` (end-of-line tokens), and the image codes
of the ``same_row`` and of the ``rows_above``. The shares of a query sum to one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from hawkspec.backbones.base import Backbone, ImageGrid
from hawkspec.decoding.sampling import SamplingConfig, batch_generator

ANCHORS = ("next", "query")
SHARES = ("prompt", "image_start", "eol", "same_row", "rows_above")


@dataclass
class OffsetAttention:
    """Attention summed by spatial offset; add results of several batches with ``+``.

    Attributes:
        grid: The image layout.
        anchor: ``"next"`` or ``"query"`` (module docstring).
        sums: (layers, rows, 2*cols - 1) attention summed over images, queries and (mean over) heads, per offset
            ``(dr, dc)`` at index ``[dr + rows - 1, dc + cols - 1]``; dr in ``[-(rows-1), 0]``.
        counts: (rows, 2*cols - 1) how many (image, query) pairs have a visible key code at that offset.
        share_sums: {name: (layers,)} attention mass summed over images and queries, per slot kind (:data:`SHARES`).
        queries: (image, query) pairs summed.
        images: Images summed.
    """

    grid: ImageGrid
    anchor: str
    sums: torch.Tensor
    counts: torch.Tensor
    share_sums: dict = field(default_factory=dict)
    queries: int = 0
    images: int = 0

    def __add__(self, other: "OffsetAttention") -> "OffsetAttention":
        if (self.grid, self.anchor) != (other.grid, other.anchor) or self.sums.shape != other.sums.shape:
            raise ValueError("cannot add offset maps of different grids, anchors or layer counts")
        return OffsetAttention(self.grid, self.anchor, self.sums + other.sums, self.counts + other.counts,
                               {k: self.share_sums[k] + other.share_sums[k] for k in self.share_sums},
                               self.queries + other.queries, self.images + other.images)

    @property
    def per_layer(self) -> torch.Tensor:
        """(layers, rows, 2*cols - 1) mean attention by offset per layer (heads averaged); NaN where no key."""
        return self.sums / self.counts.clamp(min=1) + torch.where(self.counts > 0, 0.0, math.nan)

    @property
    def mean(self) -> torch.Tensor:
        """(rows, 2*cols - 1) mean attention by offset over layers, heads, images and queries; NaN where no key."""
        return self.per_layer.mean(0)

    @property
    def shares(self) -> dict[str, float]:
        """Share of the attention mass per slot kind (:data:`SHARES`), averaged over everything; sums to 1."""
        return {k: float(v.mean() / max(self.queries, 1)) for k, v in self.share_sums.items()}

    @property
    def shares_per_layer(self) -> dict[str, torch.Tensor]:
        """{slot kind: (layers,)} share of the attention mass per layer."""
        return {k: v / max(self.queries, 1) for k, v in self.share_sums.items()}

    def at(self, dr: int, dc: int) -> float:
        """Mean attention at offset (dr, dc) (rows, cols relative to the anchor; dr <= 0)."""
        return float(self.mean[dr + self.grid.rows - 1, dc + self.grid.cols - 1])

    def window(self, rows_above: int | None = None, cols_each_side: int | None = None,
               layer: int | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
        """The map around the anchor: (rows_above + 1, 2*cols_each_side + 1), its dr and dc labels.
        ``layer`` None: averaged over layers."""
        R, C = self.grid.rows, self.grid.cols
        ra = R - 1 if rows_above is None else min(rows_above, R - 1)
        ce = C - 1 if cols_each_side is None else min(cols_each_side, C - 1)
        full = self.mean if layer is None else self.per_layer[layer]
        sub = full[R - 1 - ra :, C - 1 - ce : C + ce]
        return sub, list(range(-ra, 1)), list(range(-ce, ce + 1))

    def row_profile(self) -> dict[str, float]:
        """Mean attention to a key in the same row left of the anchor vs a key in the rows above (any column),
        and to the nearest ones: the previous token (0, -1) and the token above (-1, 0)."""
        R, C = self.grid.rows, self.grid.cols
        s, n = self.sums.mean(0), self.counts
        same = s[R - 1, : C - 1].sum() / n[R - 1, : C - 1].sum().clamp(min=1)
        above = s[: R - 1].sum() / n[: R - 1].sum().clamp(min=1)
        return {"same_row": float(same), "rows_above": float(above),
                "left": self.at(0, -1), "above": self.at(-1, 0) if R > 1 else math.nan}


@functools.lru_cache(maxsize=16)
def _pairs(grid: ImageGrid, anchor: str) -> tuple[torch.Tensor, ...]:
    """Index tensors over (query, key) body positions: the valid queries, every visible key's offset bin and the
    slot kind of every key (0 eol, 1 same row, 2 rows above)."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    L, W, R, C = grid.length, grid.tokens_per_row, grid.rows, grid.cols
    forced = grid.forced_mask()
    j = torch.arange(L)
    a = j + (1 if anchor == "next" else 0)
    valid_q = (a < L) & ~forced[a.clamp(max=L - 1)]
    ra, ca = a // W, a % W
    rk, ck = j // W, j % W
    visible = (j[None, :] <= j[:, None]) & valid_q[:, None]  # (Lq, Lk)
    code_key = ~forced[None, :].expand(L, L)
    dr, dc = rk[None, :] - ra[:, None], ck[None, :] - ca[:, None]
    in_map = visible & code_key
    bins = ((dr + R - 1) * (2 * C - 1) + dc + C - 1)[in_map]
    kind = torch.where(~code_key, 0, torch.where(dr == 0, 1, 2))  # (Lq, Lk)
    return valid_q, in_map, bins, visible, kind


def attention_by_offset(attn: torch.Tensor, grid: ImageGrid, num_image_start: int, anchor: str = "next") -> OffsetAttention:
    """Reduce attention probabilities to the offset map.

    Args:
        attn: (layers, B, heads, L, S) from :meth:`Backbone.attention_maps`: queries the ``L = grid.length``
            body tokens (or a prefix of them), keys all ``S`` slots, the body the last ``L``.
        grid: The image layout.
        num_image_start: Slots of the image-start sequence just before the body (``len(backbone.image_start_ids)``).
        anchor: ``"next"`` or ``"query"`` (module docstring).
    """
    layers, B, _, Lq, S = attn.shape
    L = grid.length
    if Lq != L:
        raise ValueError(f"attention over {Lq} body queries; the grid {grid.rows}x{grid.tokens_per_row} has {L}")
    if S < L + num_image_start:
        raise ValueError(f"{S} key slots cannot hold {num_image_start} image-start slots and the {L}-token body")
    valid_q, in_map, bins, visible, kind = _pairs(grid, anchor)
    a = attn.float().mean(2)  # (layers, B, L, S) heads averaged
    body = a[..., S - L :]  # (layers, B, L, L)
    nbins = grid.rows * (2 * grid.cols - 1)
    per_pair = body[..., in_map].sum(1)  # (layers, npairs) summed over images
    sums = torch.zeros(layers, nbins).index_add_(1, bins, per_pair)
    counts = torch.bincount(bins, minlength=nbins) * B
    a_q = a[:, :, valid_q]  # (layers, B, Q, S)
    body_q = body[:, :, valid_q] * visible[valid_q]  # (layers, B, Q, L)
    kind_q = kind[valid_q]
    start = a_q[..., S - L - num_image_start : S - L].sum(-1)
    shares = {
        "prompt": a_q[..., : S - L - num_image_start].sum(-1),
        "image_start": start,
        "eol": (body_q * (kind_q == 0)).sum(-1),
        "same_row": (body_q * (kind_q == 1)).sum(-1),
        "rows_above": (body_q * (kind_q == 2)).sum(-1),
    }
    return OffsetAttention(
        grid, anchor, sums.view(layers, grid.rows, 2 * grid.cols - 1), counts.view(grid.rows, 2 * grid.cols - 1),
        {k: v.sum((1, 2)) for k, v in shares.items()}, queries=B * int(valid_q.sum()), images=B,
    )


@torch.no_grad()
def self_samples(backbone: Backbone, prompts: Sequence[str], sampling: SamplingConfig | None = None,
                 batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """(N, rows, cols) codes the backbone samples for ``prompts`` with plain AR (seeded per batch)."""
    from hawkspec.decoding.ar import ar_generate

    sampling = sampling or SamplingConfig()
    out = []
    for i in range(0, len(prompts), batch_size):
        g = batch_generator(seed, i, backbone.code_token_ids.device)
        out.append(ar_generate(backbone, list(prompts[i : i + batch_size]), sampling, g).codes.cpu())
    return torch.cat(out)


@torch.no_grad()
def offset_attention(backbone: Backbone, prompts: Sequence[str], codes: torch.Tensor | None = None,
                     sampling: SamplingConfig | None = None, anchor: str = "next", batch_size: int = 4,
                     seed: int = 0) -> OffsetAttention:
    """The offset map of ``backbone`` over images of ``prompts``, teacher-forced.

    Args:
        backbone: Any adapter that implements :meth:`~hawkspec.backbones.base.Backbone.attention_maps`.
        prompts: Captions.
        codes: (N, rows, cols) image codes, one per prompt; None: the backbone's own AR samples under ``sampling``.
        anchor: ``"next"`` or ``"query"`` (module docstring).
        batch_size: Images per attention call (all layers' maps of a batch are in memory at once: use 1 for a
            7B model at full resolution).
        seed: Seeds the AR samples.
    """
    if codes is None:
        codes = self_samples(backbone, prompts, sampling, batch_size, seed)
    if codes.shape[0] != len(prompts):
        raise ValueError(f"{codes.shape[0]} images for {len(prompts)} prompts")
    total = None
    dev = backbone.code_token_ids.device
    for i in range(0, len(prompts), batch_size):
        batch = list(prompts[i : i + batch_size])
        attn = backbone.attention_maps(backbone.encode(batch), backbone.body_ids(codes[i : i + batch_size].to(dev)))
        part = attention_by_offset(attn.cpu(), backbone.grid, len(backbone.image_start_ids), anchor)
        total = part if total is None else total + part
    return total
