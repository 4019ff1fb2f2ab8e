"""Plots from ``hawkspec-eval`` outputs (``results.json`` files or folders of runs, e.g. a multirun folder).

    python experiments/plots.py speed-quality RESULTS...   # speedup vs FID per decoder  -> speed_quality.png
    python experiments/plots.py acceptance-vsd RESULTS...  # acceptance vs VSD (Hawk)    -> acceptance_vs_vsd.png

* ``speed-quality``: one point per decoder and sweep setting (mean over runs and seeds), x = speedup (``--x step_compression`` for the
  hardware-independent axis), y = FID (``--y alignment`` / ``diversity`` / ``clip_score``); the band around AR is
  the noise floor (AR with another seed), so points inside it are as good as AR within sampling noise.
* ``acceptance-vsd``: for every row of a Hawk decoder (``--decoder``, default ``hawk``), the acceptance length and
  step compression against its vertical speculation depth (``built.proposer.sources.vertical.vsd``), e.g. from
  ``hawkspec-eval -m 'eval.decoders=[ar,hawk]' eval.decoders.hawk.proposer.sources.vertical.vsd=1,2,3
  paths.heads_dir=...``.

Per-head accuracy by distance (Hawk Fig. 4) is ``experiments/head_accuracy.py``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hawkspec.metrics.sweep import Job, built_of, load_jobs, split_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.mean(vals) if vals else None


def setting(decoder: str, job: Job, jobs: list[Job]) -> str:
    """The sweep setting a row of ``decoder`` in ``job`` was made with, e.g. ``group=7``: the overrides that vary
    between the jobs running that decoder and act on it -- ``eval.decoders.<decoder>.*`` keys act on that decoder
    only (and, in sweeps made before decoders were config nodes, ``decoder.*`` keys on the run's own ``decoder``,
    hawk by default), the other keys on every decoder; seeds are averaged over, not kept apart."""
    mine = [j for j in jobs if any(r["decoder"] == decoder for r in j.results["rows"])]
    varying = split_overrides(mine)[0] if len(mine) > 1 else []
    own = job.overrides.get("decoder", "hawk") == decoder

    def acts(k: str) -> bool:
        if k in ("seed", "decoder", "decoders", "eval.decoders") or "decoder@" in k:
            return False
        if k.startswith("eval.decoders."):
            return k.startswith(f"eval.decoders.{decoder}.")
        return own or not k.startswith("decoder.")

    return ", ".join(f"{k.rsplit('.', 1)[-1]}={job.overrides[k]}" for k in varying if acts(k) and k in job.overrides)


def speed_quality(jobs: list[Job], out: Path, x: str = "speedup", y: str = "fid", command: str = "") -> Path:
    by: dict[str, list[dict]] = {}
    for j in jobs:
        for r in j.results["rows"]:
            tag = setting(r["decoder"], j, jobs)
            by.setdefault(f"{r['decoder']} ({tag})" if tag else r["decoder"], []).append(r)
    pts = {d: (_mean([r.get(x) for r in rs]), _mean([r.get(y) for r in rs])) for d, rs in by.items()}
    pts = {d: p for d, p in pts.items() if None not in p}
    if not pts:
        raise ValueError(f"no row has both {x} and {y}: were the runs made with eval.quality.enabled=true?")
    feats = (jobs[0].results.get("quality") or {}).get("fid_features", "?")
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    floor = _mean([((j.results.get("quality") or {}).get("noise_floor") or {}).get("delta", {}).get(y) for j in jobs])
    if "ar" in pts and floor is not None:
        ar_y = pts["ar"][1]
        ax.axhspan(ar_y - floor, ar_y + floor, color="0.85", label=f"AR ± noise floor ({floor:.3g})")
    for d, (px, py) in sorted(pts.items()):
        lossless = by[d][0].get("lossless")
        ax.scatter(px, py, marker="o" if lossless else "x", s=40, color="C0" if lossless else "C3")
        ax.annotate(d, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x.replace("_", " ") + " vs AR (×)")
    ax.set_ylabel(f"FID ({feats})" if y == "fid" else y.replace("_", " "))
    ax.set_title(f"speed vs quality ({jobs[0].results.get('backbone')}, {jobs[0].results.get('num_prompts')} prompts; "
                 "o lossless, x lossy)", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, out, command)


def _save(fig, out: Path, command: str) -> Path:
    """Write ``fig`` to ``out`` with the command that made it in small print."""
    if command:
        fig.text(0.01, 0.005, command, fontsize=5, color="0.4")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def row_vsd(row: dict, job: Job, decoder: str):
    """The vertical speculation depth a row was decoded with: what was built (the vertical source's ``vsd``; the
    proposer's own in results written before sources), else the job's override of it (either spelling)."""
    prop = built_of(row).get("proposer") or {}
    vsd = ((prop.get("sources") or {}).get("vertical") or {}).get("vsd", prop.get("vsd"))
    for key in (f"eval.decoders.{decoder}.proposer.sources.vertical.vsd", "decoder.proposer.vsd"):
        if vsd is None and key in job.overrides:
            vsd = job.overrides[key]
    return None if vsd is None else int(vsd)


def acceptance_vsd(jobs: list[Job], out: Path, decoder: str = "hawk", command: str = "") -> Path:
    pts: dict[int, list[dict]] = {}
    for j in jobs:
        for r in j.results["rows"]:
            if r["decoder"] != decoder:
                continue
            vsd = row_vsd(r, j, decoder)
            if vsd is not None:
                pts.setdefault(int(vsd), []).append(r)
    if not pts:
        raise ValueError(f"no `{decoder}` row with a vertical speculation depth (config.proposer.vsd) in these runs")
    xs = sorted(pts)
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for key, style in (("acceptance_length", "o-"), ("step_compression", "s--")):
        ax.plot(xs, [_mean([r.get(key) for r in pts[v]]) for v in xs], style, label=key.replace("_", " "))
    ax.set_xlabel("vertical speculation depth (VSD)")
    ax.set_xticks(xs)
    ax.set_ylabel("tokens per forward / ×")
    ax.set_title(f"{decoder}: acceptance vs VSD ({jobs[0].results.get('num_prompts')} prompts)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, command)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plot", choices=["speed-quality", "acceptance-vsd"])
    ap.add_argument("results", nargs="+", help="results.json files or folders of hawkspec-eval runs")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"), help="output folder")
    ap.add_argument("--x", default="speedup", choices=["speedup", "step_compression", "acceptance_length"])
    ap.add_argument("--y", default="fid", choices=["fid", "alignment", "diversity", "clip_score"])
    ap.add_argument("--decoder", default="hawk", help="acceptance-vsd: the decoder whose VSD varies")
    args = ap.parse_args(argv)
    jobs = load_jobs(args.results)
    cmd = "python experiments/plots.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.plot == "speed-quality":
        path = speed_quality(jobs, Path(args.out) / "speed_quality.png", args.x, args.y, cmd)
    else:
        path = acceptance_vsd(jobs, Path(args.out) / "acceptance_vs_vsd.png", args.decoder, cmd)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
