"""The Hawk paper's Figure 4 on our backbone: draft-head accuracy against the distance of the predicted token.

Reads ``val_metrics.json`` of a trained Hawk head set (written by ``hawkspec-train`` next to the heads) and writes

* ``head_accuracy.md``: one row per head — offset in tokens from the source position, displacement in rows and
  columns, validation top-1 and top-5 (against the cached codes, see ``hawkspec.training.heads``);
* ``head_accuracy.png``: top-1 against the offset in tokens, horizontal heads vs vertical heads.

    python experiments/head_accuracy.py outputs/quickstart/heads/hawk
    python experiments/head_accuracy.py path/to/val_metrics.json --out experiments/results

The figure in experiments/results/ comes from this run on the shipped tiny model (about 12 min on a 2-core CPU)::

    hawkspec-cache hydra.run.dir=outputs/fig4/cache cache.num_samples=2048 cache.val_samples=256
    hawkspec-train hydra.run.dir=outputs/fig4/train_hawk shards_dir=outputs/fig4/cache/shards \
        heads.num_horizontal=6 heads.vsd=4 trainer.max_epochs=8 export_dir=outputs/fig4/heads
    python experiments/head_accuracy.py outputs/fig4/heads
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hawkspec.analysis.plots import plot_accuracy_by_distance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_report(path: Path) -> dict:
    """The ``val_metrics.json`` at ``path`` (a file, or a heads folder holding one)."""
    path = path / "val_metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train heads with `hawkspec-train` first")
    report = json.loads(path.read_text())
    if not any(r["top1"] is not None for r in report["heads"]):
        raise ValueError(f"{path} has no validation metrics (was the run trained without a val split?)")
    return report


def markdown(report: dict, source: str) -> str:
    b = report.get("backbone", {})
    grid = b.get("grid", {})
    lines = [
        "# Draft-head accuracy vs distance (Hawk Figure 4 analogue)",
        "",
        f"Heads `{source}`: backbone `{b.get('backbone')}` revision `{b.get('revision')}`, grid "
        f"{grid.get('rows')}x{grid.get('cols')} (W = {report['tokens_per_row']} tokens per row, end-of-line "
        f"included), trained {report['global_step']} steps. Accuracy of each head's argmax (top-1) and top-5 "
        "against the validation cache's codes at the head's target position, micro-averaged over valid targets.",
        "",
        f"Heads config: {', '.join(f'{k}={v}' for k, v in report.get('config', {}).items())}. "
        "The commands that made the shipped figure are in `experiments/head_accuracy.py`.",
        "",
        "| head | offset (tokens) | rows | cols | top-1 | top-5 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["heads"]:
        lines.append(f"| {r['name']} | {r['offset']} | {r['rows']} | {r['cols']} | {r['top1']:.3f} | {r['top5']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Top-1 by distance, horizontal vs vertical (drawn by :func:`hawkspec.analysis.plots.plot_accuracy_by_distance`,
    the same picture ``notebooks/heads_by_distance.ipynb`` draws from shards or self-samples)."""
    fig = plot_accuracy_by_distance(report["heads"], title="Draft-head accuracy vs distance")
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("heads", type=Path, help="a heads folder or its val_metrics.json")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = ap.parse_args()
    report = load_report(args.heads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_accuracy.md").write_text(markdown(report, str(args.heads)))
    plot(report, args.out / "head_accuracy.png")
    print(f"wrote {args.out / 'head_accuracy.md'} and {args.out / 'head_accuracy.png'}")


if __name__ == "__main__":
    main()
