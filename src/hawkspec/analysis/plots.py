"""Matplotlib drawings of the analysis results (the notebooks and ``experiments/analysis_figures.py`` call these).

Every function draws into ``ax`` (or a new figure) and returns the figure; none calls ``plt.show()``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from hawkspec.analysis.attention import SHARES, OffsetAttention


def _axes(ax=None, figsize=(5, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, dpi=110)
        return fig, ax
    return ax.figure, ax


def plot_grid_map(values: torch.Tensor, ax=None, title: str = "", label: str = "", cmap: str = "viridis",
                  vmin: float | None = None, vmax: float | None = None, annotate: bool = False):
    """A (rows, cols) map over the image grid (row 0 at the top, as the image is written); NaN cells blank."""
    fig, ax = _axes(ax, (4.2, 3.6))
    v = values.double().numpy()
    im = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
    if annotate:
        for (r, c), x in __import__("numpy").ndenumerate(v):
            if not math.isnan(x):
                ax.text(c, r, f"{x:.2f}", ha="center", va="center", fontsize=6, color="w")
    return fig


def plot_offset_attention(res: OffsetAttention, ax=None, rows_above: int | None = 4,
                          cols_each_side: int | None = 6, layer: int | None = None, log: bool = True):
    """The offset map around the anchor (marked): rows above on top, the anchor's row at the bottom, columns
    left and right of it. ``log``: colour on a log scale (the nearest keys take most of the mass)."""
    from matplotlib.colors import LogNorm

    fig, ax = _axes(ax, (5.2, 3.4))
    sub, drs, dcs = res.window(rows_above, cols_each_side, layer)
    v = sub.double().numpy()
    finite = v[~__import__("numpy").isnan(v)]
    norm = LogNorm(vmin=max(float(finite.min()), 1e-4), vmax=float(finite.max())) if log and finite.size else None
    im = ax.imshow(v, cmap="magma", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(dcs)), [str(d) for d in dcs], fontsize=7)
    ax.set_yticks(range(len(drs)), [str(d) for d in drs], fontsize=7)
    ax.set_xlabel("column offset of the key")
    ax.set_ylabel("row offset of the key")
    ax.plot([dcs.index(0)], [drs.index(0)], marker="*", color="cyan", markersize=12, linestyle="none",
            label="next token" if res.anchor == "next" else "current token")
    ax.legend(loc="lower right", fontsize=7, framealpha=0.6)
    where = "averaged over layers" if layer is None else f"layer {layer}"
    ax.set_title(f"attention by offset ({where}, heads, {res.images} images)", fontsize=9)
    fig.colorbar(im, ax=ax, label="mean attention weight", fraction=0.046, pad=0.04)
    return fig


def plot_attention_shares(res: OffsetAttention, ax=None):
    """Stacked bars, one per layer (and their mean): the share of attention going to the prompt, the image-start
    slots, end-of-line tokens, codes of the same row and codes of the rows above."""
    fig, ax = _axes(ax, (5, 3.2))
    per = res.shares_per_layer
    layers = per[SHARES[0]].numel()
    labels = [f"L{i}" for i in range(layers)] + ["mean"]
    bottom = torch.zeros(layers + 1)
    for k in SHARES:
        vals = torch.cat([per[k], per[k].mean().view(1)])
        ax.bar(labels, vals.numpy(), bottom=bottom.numpy(), label=k.replace("_", " "))
        bottom += vals
    ax.set_ylabel("share of attention mass")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("where the attention goes, per layer", fontsize=9)
    fig.tight_layout()
    return fig


def plot_accuracy_by_distance(rows: Sequence[dict], ax=None, metric: str = "top1", title: str | None = None):
    """Top-1 (or ``metric``) of every head against the distance of its target in tokens, horizontal heads vs
    vertical heads. ``rows``: :meth:`HeadAccuracy.rows <hawkspec.analysis.heads.HeadAccuracy.rows>` or the
    ``heads`` list of a ``val_metrics.json``."""
    fig, ax = _axes(ax, (5.5, 3.6))
    for kind, style in (("horizontal", "o-"), ("vertical", "s-")):
        sel = [r for r in rows if r["kind"] == kind and r.get(metric) is not None]
        if sel:
            ax.plot([r["offset"] for r in sel], [r[metric] for r in sel], style, label=f"{kind} heads")
            for r in sel:
                ax.annotate(r["name"], (r["offset"], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("distance of the predicted token (tokens ahead of the source)")
    ax.set_ylabel(f"{metric.replace('top', 'top-')} accuracy")
    vals = [r[metric] for r in rows if r.get(metric) is not None]
    ax.set_ylim(0, max(0.05, max(vals, default=0.05) * 1.15))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Draft-head accuracy vs distance", fontsize=9)
    fig.tight_layout()
    return fig


def plot_acceptance_maps(results: dict, grid=None, kinds: Sequence[str] = ("vertical", "vertical_only"),
                         figsize_per: float = 3.1):
    """One row of panels: each decoder's acceptance map (same colour scale), then for every decoder that
    recorded sources the map of each of ``kinds`` (:meth:`AcceptanceMaps.source_map
    <hawkspec.analysis.acceptance.AcceptanceMaps.source_map>`)."""
    import matplotlib.pyplot as plt

    panels = [(r.name, r.map, f"{r.name}" + ("" if r.lossless else " (lossy)") + f": accepted {r.acceptance_rate:.2f}"
               + (f", x{r.step_compression(grid):.2f} steps" if grid is not None else ""))
              for r in results.values()]
    for r in results.values():
        for kind in kinds:
            m = r.source_map(kind)
            if m is not None:
                panels.append((r.name, m, f"{r.name}: accepted {kind.replace('_', ' ')} draft"))
    fig, axes = plt.subplots(1, len(panels), figsize=(figsize_per * len(panels), figsize_per * 0.95), dpi=110,
                             squeeze=False)
    for ax, (_, m, title) in zip(axes[0], panels):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("column", fontsize=8)
        ax.set_ylabel("row", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=list(axes[0]), label="share of images", fraction=0.02, pad=0.01)
    return fig
