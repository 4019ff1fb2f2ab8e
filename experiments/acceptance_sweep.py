"""Acceptance length and step compression of decoder variants, untimed (machine-independent and fast).

Each variant is a space-separated list of Hydra overrides of ``conf/eval.yaml``; all variants decode the same
prompts with the same seed, in one process, with the backbone loaded once. Wall-clock belongs to
``hawkspec-eval`` (``make bench``); this is for ablations where the forward count is the question.

    python experiments/acceptance_sweep.py --prompts 16 --out experiments/results/vsd_sweep.md \\
        --variant "decoder=hawk decoder.proposer.vertical=false" \\
        --variant "decoder=hawk decoder.proposer.vsd=1" --variant "decoder=hawk decoder.proposer.vsd=2"

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

from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.cli.eval import eval_prompts
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.metrics.speed import image_counters, summarize


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="Hydra overrides of one variant")
    ap.add_argument("--common", default="", help="overrides applied to every variant")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="markdown table (a .json beside it)")
    args = ap.parse_args(argv)
    common = shlex.split(args.common)
    # paths.root_dir resolves through Hydra's runtime config outside a Hydra app; pin it to the repository
    pinned = [f"paths.root_dir={Path(CONF_DIR).parent}"]
    rows = []
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        base = compose("eval", overrides=pinned + common + [f"eval.num_prompts={args.prompts}"])
        backbone = instantiate(base.backbone, "backbone").to(base.device).eval()
        sampling = SamplingConfig(**base.sampling).validate(backbone.num_codes)
        prompts = eval_prompts(base)
        batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
        for variant in args.variant:
            cfg = compose("eval", overrides=pinned + common + shlex.split(variant))
            decoder = build_decoder(cfg.decoder, backbone, sampling)
            outs = [decoder.generate(b, torch.Generator(device=base.device).manual_seed(args.seed * 100_003 + i))
                    for i, b in enumerate(batches)]
            L = backbone.grid.length
            stats = summarize([image_counters(o, L) for o in outs], L)
            rows.append({"variant": variant, "lossless": bool(decoder.lossless), **stats})
            print(f"{variant}: acceptance {stats['acceptance_length']:.3f}, "
                  f"step compression {stats['step_compression']:.3f}", flush=True)
    if args.out:
        cmd = "python experiments/acceptance_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        lines = [f"Made by: `{cmd}`", "", f"{args.prompts} procedural prompts, batch {args.batch_size}, seed "
                 f"{args.seed}; sampling: {dict(base.sampling)}.", "",
                 "| variant | lossless | acceptance length | forwards/image | step compression |", "|---|---|---|---|---|"]
        lines += [f"| `{r['variant']}` | {r['lossless']} | {r['acceptance_length']:.3f} | "
                  f"{r['forwards_per_image']:.2f} | {r['step_compression']:.3f} |" for r in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
