"""Where does step-compiled AR lose time? AR on the tiny model, in one process: eager, whole steps compiled with
every runner's body on one shared code object (as before the fix), whole steps compiled with one code object per
runner and key (the fix), and compiled forwards; median of interleaved passes, with the dynamo cache entries
of each compiled AR step. The other decoders of ``make bench`` compile their steps first, as in a bench run.

    python experiments/ar_step_modes.py [N_PROMPTS] [PASSES]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_dir

import hawkspec.decoding.static as static
from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.cli.eval import decoder_config, eval_prompt_set
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig

N = int(sys.argv[1]) if len(sys.argv) > 1 else 8
PASSES = int(sys.argv[2]) if len(sys.argv) > 2 else 5
OTHERS = ["medusa", "hawk", "sjd", "hawk_jacobi"]


def main():
    initialize_config_dir(CONF_DIR, version_base="1.3")
    cfg = compose("eval", overrides=[f"eval.num_prompts={N}"])
    backbone = instantiate(cfg.backbone, "backbone").eval()
    backbone.compile_steps("none")
    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    prompts = [p.text for p in eval_prompt_set(cfg)][:N]
    build = lambda name: build_decoder(decoder_config(cfg, name), backbone, sampling)  # noqa: E731

    def run_all(dec, seed=0):
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            dec.generate([p], torch.Generator().manual_seed(seed * 1000 + i))
        return time.perf_counter() - t0

    def compiled_steps(own_code):  # AR and the other bench decoders, every step compiled, each warmed up twice
        static._own_code = own_code
        decoders = [build(n) for n in ["ar"] + OTHERS]
        for d in decoders:
            d.runner = static.make_runner("step")
        for d in decoders:  # warm-up: compile (the 2 first batches are eager / first variant)
            for _ in range(2):
                run_all(d)
        return decoders

    variants = {"eager": build("ar")}
    own = static._own_code
    shared = compiled_steps(lambda fn, key: fn)  # every runner's body on one code object (before the fix)
    mine = compiled_steps(own)
    variants["step, shared code"], variants["step, own code"] = shared[0], mine[0]
    run_all(variants["eager"])
    times = {k: [] for k in variants}
    for _ in range(PASSES):
        for k, d in variants.items():
            times[k].append(run_all(d) / N)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    body_code = next(iter(shared[0].runner._compiled.values()))
    entries = {
        "shared": len(_debug_get_cache_entry_list(body_code._torchdynamo_orig_callable.__code__)),
        "own": [len(_debug_get_cache_entry_list(c._torchdynamo_orig_callable.__code__))
                for c in mine[0].runner._compiled.values()],
    }
    backbone.compile_steps("forward")
    fwd = build("ar")
    for _ in range(2):
        run_all(fwd)
    times["forwards compiled"] = [run_all(fwd) / N for _ in range(PASSES)]
    print(f"AR on the tiny model, {N} prompts, batch 1, {torch.get_num_threads()} threads, median of {PASSES} passes")
    print("| AR mode | s/image | passes |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |")
    print("dynamo cache entries on the AR step's code object:", entries)


if __name__ == "__main__":
    main()
