"""Acceptance length and step compression of decoder variants; with ``--timed R`` also their speedup over AR.

Each variant is one decoder of a single run config: ``decoder=PRESET`` and that decoder's own keys
(``decoder.KEY=V``, ``decoder/GROUP=OPTION``), which become the node ``eval.decoders.v<i>`` of one composed
``conf/eval.yaml`` (the mechanism ``hawkspec-eval`` uses; ``--common`` holds the run's shared settings). So all
variants decode the same prompts with the same seed and the same target, in one process, with the backbone loaded
once. (``hawkspec-eval`` itself runs such variants too: ``+decoder@eval.decoders.vsd1=hawk
eval.decoders.vsd1.proposer.sources.vertical.vsd=1``; this script adds untimed counting and the variants' command-line labels.) Untimed (the default) is
machine-independent and fast: for ablations where the forward count is the question. ``--timed R`` makes it a
benchmark of variants that presets cannot name (a VSD, a tree size): AR is added, every decoder decodes one
warm-up batch, then R passes run with AR and the variants taking turns on every batch, and each decoder's seconds are its
median pass, so ``speedup`` = AR seconds / variant seconds comes from one run (``make bench`` does the same for
the presets); the table says under it when the passes spread or the machine was busy
(:class:`hawkspec.evaluation.Evaluation`, the library ``hawkspec-eval`` times with). Use ``--batch-size 1`` for
latency, as the papers report.

    python experiments/acceptance_sweep.py --prompts 16 --out experiments/results/vsd_sweep.md \\
        --variant "decoder=medusa decoder.heads_path=HAWK_HEADS" \\
        --variant "decoder=hawk decoder.proposer.sources.vertical.vsd=1" \\
        --variant "decoder=hawk decoder.proposer.sources.vertical.vsd=2"

Extra overrides common to every variant go in ``--common`` (e.g. ``paths.heads_dir=outputs/quickstart/heads``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.cli.eval import eval_prompts
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.evaluation import Evaluation


def variant_overrides(variant: str, node: str) -> list[str]:
    """One variant's overrides as keys of the decoder node ``eval.decoders.<node>``."""
    out, preset = [], None
    for arg in shlex.split(variant):
        key, _, value = arg.partition("=")
        if key == "decoder":
            preset = value
        elif key.startswith("decoder."):
            out.append(f"eval.decoders.{node}.{key[len('decoder.'):]}={value}")
        elif key == "decoder/tree":  # a tree of conf/tree/ for this variant only
            out.append(f"+tree@eval.decoders.{node}.tree={value}")
        elif key.startswith("decoder/"):
            group = key[len("decoder/"):]
            out.append(f"decoder/{group}@eval.decoders.{node}.{group}={value}")
        else:
            raise SystemExit(f"variant {variant!r}: {arg!r} is not a decoder key (decoder=, decoder.KEY=, "
                             "decoder/GROUP=); settings of the whole run go in --common")
    if preset is None:
        raise SystemExit(f"variant {variant!r} names no preset: start it with decoder=NAME (conf/decoder/)")
    return [f"+decoder@eval.decoders.{node}={preset}", *out]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="Hydra overrides of one variant")
    ap.add_argument("--common", default="", help="overrides applied to every variant")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="markdown table (a .json beside it)")
    ap.add_argument("--timed", type=int, default=0, metavar="R", help="R timed passes after a warm-up (0: untimed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = shlex.split(args.common)
    # paths.root_dir resolves through Hydra's runtime config outside a Hydra app; pin it to the repository
    pinned = [f"paths.root_dir={Path(CONF_DIR).parent}"]
    rows = []
    variants = (["decoder=ar"] if args.timed else []) + args.variant
    nodes = [o for i, v in enumerate(variants) for o in variant_overrides(v, f"v{i}")]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        base = compose("eval", overrides=pinned + ["decoders=none"] + nodes + common +
                       [f"eval.num_prompts={args.prompts}"])
    backbone = instantiate(base.backbone, "backbone").to(base.device).eval()
    sampling = SamplingConfig(**base.sampling).validate(backbone.num_codes)
    decoders = {v: build_decoder(base.eval.decoders[f"v{i}"], backbone, sampling, name=v) for i, v in enumerate(variants)}
    ev = Evaluation(backbone, decoders, eval_prompts(base), seed=args.seed, batch_size=args.batch_size,
                    device=base.device, repeats=args.timed, warmup_batches=1, baseline="decoder=ar")
    timing = ev.time() if args.timed else None  # warm-up, then passes in which the decoders take turns per batch
    outs = timing.outputs if timing else {v: ev.decode(v) for v in variants}
    for i, row in enumerate(ev.rows(outs, timing)):
        row = {"variant": row.pop("decoder"), **row, "config": OmegaConf.to_container(base.eval.decoders[f"v{i}"],
                                                                                       resolve=True)}
        msg = f"{row['variant']}: acceptance {row['acceptance_length']:.3f}, step compression {row['step_compression']:.3f}"
        if timing:
            msg += f", {row['seconds_per_image']:.3f} s/image, speedup {row['speedup']:.2f}"
            msg += f" (passes spread {row['pass_spread']:.1%})" if row["pass_spread"] is not None else ""
        rows.append(row)
        print(msg, flush=True)
    warnings = timing.warnings() if timing else []
    if args.out:
        cmd = "python experiments/acceptance_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        timed = (f" Timed: 1 warm-up batch, then {args.timed} passes, the decoders taking turns on every batch; seconds = the "
                 f"median pass, spread = (max - min) / median of the passes; device {base.device}, "
                 f"{torch.get_num_threads()} threads." if args.timed else "")
        lines = [f"Made by: `{cmd}`", "", f"{args.prompts} procedural prompts, batch {args.batch_size}, seed "
                 f"{args.seed}; sampling: {dict(base.sampling)}.{timed}", ""]
        head = "| variant | lossless | acceptance length | forwards/image | step compression |"
        lines += [head + (" s/image | speedup | pass spread |" if args.timed else ""), "|---" * (8 if args.timed else 5) + "|"]
        for r in rows:
            line = (f"| `{r['variant']}` | {r['lossless']} | {r['acceptance_length']:.3f} | "
                    f"{r['forwards_per_image']:.2f} | {r['step_compression']:.3f} |")
            if args.timed:
                spread = "n/a" if r["pass_spread"] is None else f"{r['pass_spread']:.1%}"
                line += f" {r['seconds_per_image']:.3f} | {r['speedup']:.2f} | {spread} |"
            lines.append(line)
        lines += [f"\n**Timing warning**: {w}." for w in warnings]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
