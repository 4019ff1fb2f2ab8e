"""Where does step-compiled AR lose time? AR on the tiny model, in one process: eager, whole steps compiled with
every runner's body on one shared code object (as before the fix), whole steps compiled with one code object per
runner and key (the fix), and compiled forwards; median of interleaved passes, with the dynamo cache entries
of each compiled AR step. The other decoders of ``make bench`` compile their steps first, as in a bench run. Timed
with :class:`hawkspec.evaluation.Evaluation` (prompt ``i`` decoded with ``batch_generator(0, i)``), which warns
under the table when the passes spread or the machine was busy.

    python experiments/ar_step_modes.py [N_PROMPTS] [PASSES]
"""

from __future__ import annotations

import statistics
import sys

import torch
from hydra import compose, initialize_config_dir

import hawkspec.decoding.static as static
from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.cli.eval import decoder_config, eval_prompt_set
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import EAGER, ExecutionMode
from hawkspec.evaluation import Evaluation, pass_spread

N = int(sys.argv[1]) if len(sys.argv) > 1 else 8
PASSES = int(sys.argv[2]) if len(sys.argv) > 2 else 5
OTHERS = ["medusa", "hawk", "sjd", "hawk_jacobi"]


def main():
    initialize_config_dir(CONF_DIR, version_base="1.3")
    cfg = compose("eval", overrides=[f"eval.num_prompts={N}"])
    backbone = instantiate(cfg.backbone, "backbone").eval()
    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    prompts = [p.text for p in eval_prompt_set(cfg)][:N]
    def build(name: str, mode: ExecutionMode = EAGER):
        return build_decoder(decoder_config(cfg, name), backbone, sampling, mode=mode)

    def evaluation(decoders: dict, baseline: str) -> Evaluation:  # batch 1; warmed up by the caller
        return Evaluation(backbone, decoders, prompts, seed=0, batch_size=1, repeats=PASSES, warmup_batches=0,
                          baseline=baseline)

    def compiled_steps(own_code):  # AR and the other bench decoders, every step compiled, each warmed up twice
        static._own_code = own_code
        decoders = {n: build(n, ExecutionMode("step")) for n in ["ar"] + OTHERS}
        ev = evaluation(decoders, "ar")
        for name in decoders:  # warm-up: compile (the 2 first batches are eager / first variant)
            for _ in range(2):
                ev.decode(name)
        return decoders

    variants = {"eager": build("ar")}
    own = static._own_code
    shared = compiled_steps(lambda fn, key: fn)  # every runner's body on one code object (before the fix)
    mine = compiled_steps(own)
    variants["step, shared code"], variants["step, own code"] = shared["ar"], mine["ar"]
    ev = evaluation(variants, "eager")
    ev.decode("eager")
    timing = ev.time()  # the three take turns on every prompt
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    body_code = next(iter(shared["ar"].runner._compiled.values()))
    entries = {
        "shared": len(_debug_get_cache_entry_list(body_code._torchdynamo_orig_callable.__code__)),
        "own": [len(_debug_get_cache_entry_list(c._torchdynamo_orig_callable.__code__))
                for c in mine["ar"].runner._compiled.values()],
    }
    # compiled forwards are the backbone's, for every decoder on it: timed on their own, after the rest
    forwards = evaluation({"forwards compiled": build("ar", ExecutionMode("forward"))}, "forwards compiled")
    for _ in range(2):
        forwards.decode("forwards compiled")
    seconds = {**timing.seconds, **(compiled := forwards.time()).seconds}
    print(f"AR on the tiny model, {N} prompts, batch 1, {torch.get_num_threads()} threads, median of {PASSES} passes")
    print("| AR mode | s/image | pass spread | passes |")
    print("|---|---|---|---|")
    for k, v in seconds.items():
        spread = pass_spread(v)
        print(f"| {k} | {statistics.median(v) / N:.3f} | {'n/a' if spread is None else f'{spread:.1%}'} | "
              f"{', '.join(f'{x / N:.3f}' for x in v)} |")
    for warning in dict.fromkeys(timing.warnings() + compiled.warnings()):
        print(f"**Timing warning**: {warning}.")
    print("dynamo cache entries on the AR step's code object:", entries)


if __name__ == "__main__":
    main()
