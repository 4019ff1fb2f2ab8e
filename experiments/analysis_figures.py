"""The three analysis pictures of ``notebooks/`` as committed PNGs, drawn by the same package functions.

* ``attention_offsets.png`` (``notebooks/attention_sinking.ipynb``): attention by spatial offset around the
  token being generated, and where the attention mass goes per layer.
* ``heads_by_distance.png`` (``notebooks/heads_by_distance.ipynb``): per-head top-1 by distance, horizontal vs
  vertical, and the KL between horizontal head 1 and vertical head 1 over the image grid.
* ``acceptance_maps.png`` (``notebooks/acceptance_maps.ipynb``): per-position acceptance of Medusa, Hawk and
  GSD over the same prompts, and where Hawk's accepted drafts were vertical ones.

The committed figures come from (about 6 min on the 2-core CPU)::

    python experiments/analysis_figures.py --out experiments/results

Other backbones / heads: ``--backbone chameleon --override backbone.path=DIR --heads-dir DIR --shards DIR``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hawkspec.analysis import (  # noqa: E402
    acceptance_maps,
    analyse_heads,
    analysis_prompts,
    hidden_batches,
    load_backbone,
    load_decoders,
    load_heads,
    offset_attention,
    sampling_config,
)
from hawkspec.analysis.plots import (  # noqa: E402
    plot_acceptance_maps,
    plot_accuracy_by_distance,
    plot_attention_shares,
    plot_grid_map,
    plot_offset_attention,
)

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("attention", "heads", "acceptance")


def attention_figure(backbone, prompts, sampling, out: Path, batch_size: int) -> str:
    res = offset_attention(backbone, prompts, sampling=sampling, batch_size=batch_size)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.4), dpi=100, gridspec_kw={"width_ratios": [1.25, 1]})
    plot_offset_attention(res, axes[0], rows_above=4, cols_each_side=6)
    plot_attention_shares(res, axes[1])
    fig.tight_layout()
    fig.savefig(out / "attention_offsets.png")
    plt.close(fig)
    p = res.row_profile()
    return (f"attention: previous token {p['left']:.3f}, token above {p['above']:.3f}, shares "
            + ", ".join(f"{k} {v:.2f}" for k, v in res.shares.items()))


def heads_figure(backbone, heads, shards, prompts, sampling, out: Path, batch_size: int) -> str:
    batches = hidden_batches(backbone, shards, len(prompts), prompts, sampling, batch_size)
    acc, kls = analyse_heads(heads, batches, backbone.grid, pairs=[(1, 1)])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    plot_accuracy_by_distance(acc.rows(), axes[0], title=f"top-1 by distance ({acc.images} images)")
    kl = kls.get((1, 1))
    if kl is not None:
        plot_grid_map(kl.map, axes[1], title=f"KL(h1 || v1) per position (mean {kl.mean:.2f} nats)", label="nats",
                      cmap="magma")
    fig.tight_layout()
    fig.savefig(out / "heads_by_distance.png")
    plt.close(fig)
    return "heads: " + ", ".join(f"{r['name']} {r['top1']:.3f}" for r in acc.rows())


def acceptance_figure(backbone, decoders, prompts, out: Path, batch_size: int) -> str:
    res = acceptance_maps(decoders, prompts, batch_size=batch_size)
    fig = plot_acceptance_maps(res, backbone.grid, kinds=("vertical",))
    fig.savefig(out / "acceptance_maps.png", bbox_inches="tight")
    plt.close(fig)
    return "acceptance: " + ", ".join(f"{n} {r.acceptance_rate:.2f}" for n, r in res.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny", help="a conf/backbone/ name")
    ap.add_argument("--override", action="append", default=[], help="Hydra override, e.g. backbone.path=DIR")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--heads-dir", default=None, help="folder with medusa/ and hawk/ heads (default: shipped)")
    ap.add_argument("--shards", default=None, help="a hawkspec-cache folder (default: teacher-forced self-samples)")
    ap.add_argument("--decoders", default="medusa,hawk,gsd")
    ap.add_argument("--images", type=int, default=16, help="images for the attention and heads figures")
    ap.add_argument("--accept-images", type=int, default=8, help="images per decoder for the acceptance figure")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", choices=FIGURES, action="append", help="draw only these figures")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    only = args.only or FIGURES
    backbone = load_backbone(args.backbone, args.override, args.device)
    sampling = sampling_config(args.override)
    prompts = analysis_prompts(args.images)
    for name in only:
        t0 = time.perf_counter()
        if name == "attention":
            line = attention_figure(backbone, prompts, sampling, args.out, min(args.batch_size, 4))
        elif name == "heads":
            heads = load_heads(Path(args.heads_dir) / "hawk" if args.heads_dir else None, backbone)
            line = heads_figure(backbone, heads, args.shards, prompts, sampling, args.out, args.batch_size)
        else:
            decoders = load_decoders(args.decoders.split(","), backbone, args.heads_dir, args.override)
            line = acceptance_figure(backbone, decoders, analysis_prompts(args.accept_images), args.out,
                                     args.batch_size)
        print(f"{line} ({time.perf_counter() - t0:.0f} s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
