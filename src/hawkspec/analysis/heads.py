"""Draft heads by distance (the Hawk paper's Figures 4 and 5): how well each horizontal and vertical head
predicts its token, and where over the image the two directions disagree.

Both read the backbone's last-layer hidden states over known images: the validation shards written by
``hawkspec-cache`` (:func:`shard_batches`), or the backbone's own AR samples teacher-forced on the spot when
no shards are given (:func:`self_sample_batches`). A batch is ``{"hidden": (B, rows*W + 1, d), "codes":
(B, rows*W)}`` with the conventions of :mod:`hawkspec.heads.offsets` (row ``s + 1`` of ``hidden`` is the
state after body position ``s``; codes are -1 at forced end-of-line slots).

* :func:`head_accuracy` — top-1 / top-5 of every head against the code at its target, micro-averaged over
  valid targets (the metric ``hawkspec-train`` logs as ``val/head_*``), plus a per-target-position top-1 map.
* :func:`draft_kl` — ``KL(p_h || p_v)`` per image position between horizontal head ``k`` and vertical head
  ``d`` drafting the *same* target position (from sources ``t - 1 - k`` and ``t - d*W``), with the heads'
  full softmax (no top-k, temperature 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from hawkspec.backbones.base import Backbone, ImageGrid
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.heads.offsets import head_targets

TOPK = (1, 5)


def head_rows(heads) -> list[dict]:
    """One dict per head of :class:`~hawkspec.heads.draft.DraftHeads`, in output order: ``name``, ``kind``
    (horizontal / vertical), ``index`` (k or d), ``offset`` (target minus source, tokens), ``rows`` and ``cols``
    (the target's displacement from the source: a vertical head d is d rows straight down)."""
    n, W = heads.config.num_horizontal, heads.tokens_per_row
    out = []
    for h, (name, offset) in enumerate(zip(heads.names, heads.offsets)):
        kind, index = ("horizontal", h + 1) if h < n else ("vertical", h - n + 1)
        dr, dc = divmod(offset, W) if kind == "vertical" else (0, offset)
        out.append({"name": name, "kind": kind, "index": index, "offset": offset, "rows": dr, "cols": dc})
    return out


@dataclass
class HeadAccuracy:
    """Counts of correct drafts per head; add results of several batches with ``+``.

    Attributes:
        heads: :func:`head_rows` of the head set.
        correct: {k: (H,) long} targets in head h's top-k, k in :data:`TOPK`.
        total: (H,) long valid targets per head.
        map_correct: (H, rows, cols) top-1 hits per target image position.
        map_total: (H, rows, cols) valid targets per target image position.
        images: Images counted.
    """

    heads: list[dict]
    correct: dict
    total: torch.Tensor
    map_correct: torch.Tensor
    map_total: torch.Tensor
    images: int = 0

    def __add__(self, other: "HeadAccuracy") -> "HeadAccuracy":
        return HeadAccuracy(self.heads, {k: v + other.correct[k] for k, v in self.correct.items()},
                            self.total + other.total, self.map_correct + other.map_correct,
                            self.map_total + other.map_total, self.images + other.images)

    def top(self, k: int = 1) -> torch.Tensor:
        """(H,) top-k accuracy per head."""
        return self.correct[k].double() / self.total.clamp(min=1)

    def rows(self) -> list[dict]:
        """:func:`head_rows` with ``top1``, ``top5`` and ``targets``: the format of the ``heads`` list in
        ``val_metrics.json`` (what :func:`plot_accuracy_by_distance` draws)."""
        tops = {k: self.top(k) for k in self.correct}
        return [{**r, **{f"top{k}": float(tops[k][h]) for k in tops}, "targets": int(self.total[h])}
                for h, r in enumerate(self.heads)]

    def maps(self) -> torch.Tensor:
        """(H, rows, cols) top-1 accuracy of each head by target image position (NaN where no target)."""
        return (self.map_correct.double() / self.map_total.clamp(min=1)).masked_fill(self.map_total == 0, float("nan"))


def _to_grid(values: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
    """(..., rows*W) per body position -> (..., rows, cols): the code positions only."""
    return values[..., grid.code_positions().to(values.device)].unflatten(-1, (grid.rows, grid.cols))


@torch.no_grad()
def head_accuracy(heads, hidden: torch.Tensor, codes: torch.Tensor, grid: ImageGrid) -> HeadAccuracy:
    """Accuracy of every head on one batch.

    Args:
        heads: :class:`~hawkspec.heads.draft.DraftHeads`.
        hidden: (B, rows*W + 1, d) hidden states.
        codes: (B, rows*W) body codes, -1 at forced slots.
        grid: The image layout.
    """
    dev = heads.device
    hidden, codes = hidden.to(dev, torch.float32), codes.to(dev).long()
    targets = head_targets(codes, grid, heads.offsets)  # (B, S, H), -100 = no target
    logits = heads(hidden)  # (B, S, H, K)
    valid = targets >= 0
    B, S, H = targets.shape
    kmax = min(max(TOPK), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices  # (B, S, H, kmax)
    hit = top == targets.unsqueeze(-1)
    correct = {k: (hit[..., :k].any(-1) & valid).sum((0, 1)).cpu() for k in TOPK if k <= kmax}
    # per target position: source row i (s = i - 1) of head h targets body position i - 1 + offset
    L = grid.length
    tgt = torch.arange(S, device=dev)[:, None] - 1 + torch.tensor(heads.offsets, device=dev)[None]  # (S, H)
    at = torch.zeros((H, L + 1), device=dev)
    n = torch.zeros((H, L + 1), device=dev)
    where = torch.where(valid, tgt[None].expand(B, S, H), L).permute(2, 0, 1).reshape(H, -1)  # (H, B*S)
    at.scatter_add_(1, where, (hit[..., 0] & valid).permute(2, 0, 1).reshape(H, -1).float())
    n.scatter_add_(1, where, valid.permute(2, 0, 1).reshape(H, -1).float())
    return HeadAccuracy(head_rows(heads), correct, valid.sum((0, 1)).cpu(),
                        _to_grid(at[:, :L], grid).long().cpu(), _to_grid(n[:, :L], grid).long().cpu(), B)


@dataclass
class DraftKL:
    """KL between a horizontal and a vertical head's drafts for the same positions; add batches with ``+``.

    Attributes:
        horizontal: k of the horizontal head.
        vertical: d of the vertical head.
        sums: (rows, cols) KL(p_h || p_v) summed over images, per target image position.
        reverse_sums: (rows, cols) KL(p_v || p_h) summed likewise.
        counts: (rows, cols) images where both heads draft that position.
    """

    horizontal: int
    vertical: int
    sums: torch.Tensor
    reverse_sums: torch.Tensor
    counts: torch.Tensor

    def __add__(self, other: "DraftKL") -> "DraftKL":
        return DraftKL(self.horizontal, self.vertical, self.sums + other.sums,
                       self.reverse_sums + other.reverse_sums, self.counts + other.counts)

    def _mean(self, s: torch.Tensor) -> torch.Tensor:
        return (s / self.counts.clamp(min=1)).masked_fill(self.counts == 0, float("nan"))

    @property
    def map(self) -> torch.Tensor:
        """(rows, cols) mean KL(p_h || p_v) per image position, NaN where one head never drafts it."""
        return self._mean(self.sums)

    @property
    def reverse_map(self) -> torch.Tensor:
        """(rows, cols) mean KL(p_v || p_h)."""
        return self._mean(self.reverse_sums)

    @property
    def mean(self) -> float:
        """KL(p_h || p_v) averaged over every (image, position) pair."""
        return float(self.sums.sum() / self.counts.sum().clamp(min=1))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def draft_kl(heads, hidden: torch.Tensor, grid: ImageGrid, horizontal: int = 1, vertical: int = 1) -> DraftKL:
    """KL between horizontal head ``horizontal`` and vertical head ``vertical`` at every target position of
    one batch of hidden states (B, rows*W + 1, d)."""
    n, V = heads.config.num_horizontal, heads.config.num_vertical
    if not 1 <= horizontal <= n:
        raise ValueError(f"horizontal head {horizontal} does not exist: these heads have h1..h{n}")
    if not 1 <= vertical <= V:
        raise ValueError(f"vertical head {vertical} does not exist: these heads have "
                         + (f"v1..v{V}" if V else "no vertical heads (heads.vertical=false)"))
    dev = heads.device
    hidden = hidden.to(dev, torch.float32)
    B, S, _ = hidden.shape
    L, W = grid.length, grid.tokens_per_row
    t = torch.arange(L, device=dev)  # target body positions
    rows_h, rows_v = t - horizontal, t - vertical * W + 1  # hidden rows of their sources (s + 1)
    ok = (rows_h >= 0) & (rows_v >= 0) & ~grid.forced_mask().to(dev)
    hh = heads.horizontal(hidden[:, rows_h.clamp(min=0)])[..., horizontal - 1, :]  # (B, L, K)
    hv = heads.vertical(hidden[:, rows_v.clamp(min=0)])[..., vertical - 1, :]
    lp, lq = hh.float().log_softmax(-1), hv.float().log_softmax(-1)
    fwd = torch.where(ok, _kl(lp, lq), 0.0).sum(0)  # (L,)
    rev = torch.where(ok, _kl(lq, lp), 0.0).sum(0)
    cnt = ok.long() * B
    return DraftKL(horizontal, vertical, _to_grid(fwd, grid).cpu(), _to_grid(rev, grid).cpu(), _to_grid(cnt, grid).cpu())


# --------------------------------------------------------------------------------------------- data sources
def shard_batches(shards: str | Path, backbone: Backbone, num_images: int | None = None,
                  batch_size: int = 16) -> Iterator[dict]:
    """Batches ``{"hidden", "codes"}`` of a ``hawkspec-cache`` split: ``shards`` is a split folder (with
    ``manifest.json``) or a cache folder, whose ``val`` split is read (else ``train``). Checked against the
    backbone like training checks it; stops after ``num_images``."""
    from hawkspec.data.shards import ShardDataModule

    folder = Path(shards)
    if not (folder / "manifest.json").is_file():
        for split in ("val", "train"):
            if (folder / split / "manifest.json").is_file():
                folder = folder / split
                break
        else:
            raise FileNotFoundError(f"{shards} holds no hawkspec-cache split (no manifest.json in it, val/ or "
                                    "train/): run `hawkspec-cache` first, or pass shards=None for self-samples")
    dm = ShardDataModule(str(folder), str(folder), batch_size=batch_size, resampled=False, shuffle_buffer=0,
                         num_workers=0, identity=backbone.identity())
    seen = 0
    for batch in dm.val_dataloader():
        take = batch["hidden"].shape[0] if num_images is None else min(batch["hidden"].shape[0], num_images - seen)
        if take <= 0:
            return
        yield {"hidden": batch["hidden"][:take], "codes": batch["codes"][:take]}
        seen += take


@torch.no_grad()
def self_sample_batches(backbone: Backbone, prompts: Sequence[str], sampling: SamplingConfig | None = None,
                        batch_size: int = 8, seed: int = 0) -> Iterator[dict]:
    """Batches ``{"hidden", "codes"}`` from the backbone's own AR samples for ``prompts``, teacher-forced
    (what ``hawkspec-cache`` writes with ``cache.source=self``, computed on the spot)."""
    from hawkspec.analysis.attention import self_samples
    from hawkspec.cache.teacher import body_codes, teacher_forced_states

    sampling = sampling or SamplingConfig()
    for i in range(0, len(prompts), batch_size):
        batch = list(prompts[i : i + batch_size])
        codes = self_samples(backbone, batch, sampling, batch_size, seed + i)
        hidden, _, _ = teacher_forced_states(backbone, batch, codes.to(backbone.code_token_ids.device), sampling, 0)
        yield {"hidden": hidden[: len(batch)], "codes": body_codes(backbone.grid, codes)}


def hidden_batches(backbone: Backbone, shards: str | Path | None = None, num_images: int = 64,
                   prompts: Sequence[str] | None = None, sampling: SamplingConfig | None = None,
                   batch_size: int = 8, seed: int = 0) -> Iterator[dict]:
    """:func:`shard_batches` when ``shards`` is set, else :func:`self_sample_batches` over ``prompts`` (default:
    ``num_images`` procedural captions)."""
    if shards is not None:
        return shard_batches(shards, backbone, num_images, batch_size)
    if prompts is None:
        from hawkspec.analysis.loading import analysis_prompts

        prompts = analysis_prompts(num_images)
    return self_sample_batches(backbone, list(prompts)[:num_images], sampling, batch_size, seed)


def analyse_heads(heads, batches: Iterable[dict], grid: ImageGrid,
                  pairs: Sequence[tuple[int, int]] = ((1, 1),)) -> tuple[HeadAccuracy, dict]:
    """One pass over ``batches``: the accuracy of every head and, for each (k, d) in ``pairs``, the
    :class:`DraftKL` between horizontal head k and vertical head d (``{(k, d): DraftKL}``; none without
    vertical heads)."""
    acc, kls = None, {}
    for batch in batches:
        a = head_accuracy(heads, batch["hidden"], batch["codes"], grid)
        acc = a if acc is None else acc + a
        if heads.config.num_vertical:
            for k, d in pairs:
                part = draft_kl(heads, batch["hidden"], grid, k, d)
                kls[(k, d)] = kls[(k, d)] + part if (k, d) in kls else part
    if acc is None:
        raise ValueError("no batches: the shards are empty or num_images is 0")
    return acc, kls
