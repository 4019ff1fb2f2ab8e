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
the presets). Use ``--batch-size 1`` for latency, as the papers report.

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
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.cli.eval import eval_prompts
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig, batch_generator
from hawkspec.metrics.speed import image_counters, interleaved_passes, summarize


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
    prompts = eval_prompts(base)
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    decoders = [(v, build_decoder(base.eval.decoders[f"v{i}"], backbone, sampling, name=v))
                for i, v in enumerate(variants)]

    def gen(i: int) -> torch.Generator:
        return batch_generator(args.seed, i, base.device)

    if args.timed:  # warm-up, then passes in which the decoders take turns on every batch
        passes, outs = interleaved_passes(dict(decoders), batches, gen, repeats=args.timed)
        seconds = {v: [x / len(prompts) for x in passes[v]] for v in passes}
    else:
        outs = {v: [d.generate(b, gen(i)) for i, b in enumerate(batches)] for v, d in decoders}
    L = backbone.grid.length
    ar_sec = statistics.median(seconds["decoder=ar"]) if args.timed else None
    for variant, decoder in decoders:
        stats = summarize([image_counters(o, L) for o in outs[variant]], L)
        row = {"variant": variant, "lossless": bool(decoder.lossless), **stats,
               "config": OmegaConf.to_container(base.eval.decoders[f"v{variants.index(variant)}"], resolve=True)}
        msg = f"{variant}: acceptance {stats['acceptance_length']:.3f}, step compression {stats['step_compression']:.3f}"
        if args.timed:
            row["seconds_per_image"] = statistics.median(seconds[variant])
            row["seconds_per_pass"] = [x * len(prompts) for x in seconds[variant]]
            row["speedup"] = ar_sec / row["seconds_per_image"]
            msg += f", {row['seconds_per_image']:.3f} s/image, speedup {row['speedup']:.2f}"
        rows.append(row)
        print(msg, flush=True)
    if args.out:
        cmd = "python experiments/acceptance_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        timing = (f" Timed: 1 warm-up batch, then {args.timed} passes, the decoders taking turns on every batch; seconds = the "
                  f"median pass; device {base.device}, {torch.get_num_threads()} threads." if args.timed else "")
        lines = [f"Made by: `{cmd}`", "", f"{args.prompts} procedural prompts, batch {args.batch_size}, seed "
                 f"{args.seed}; sampling: {dict(base.sampling)}.{timing}", ""]
        head = "| variant | lossless | acceptance length | forwards/image | step compression |"
        lines += [head + (" s/image | speedup |" if args.timed else ""), "|---" * (7 if args.timed else 5) + "|"]
        for r in rows:
            line = (f"| `{r['variant']}` | {r['lossless']} | {r['acceptance_length']:.3f} | "
                    f"{r['forwards_per_image']:.2f} | {r['step_compression']:.3f} |")
            if args.timed:
                line += f" {r['seconds_per_image']:.3f} | {r['speedup']:.2f} |"
            lines.append(line)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
