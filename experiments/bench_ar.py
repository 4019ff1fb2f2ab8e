"""Is our AR baseline as fast as transformers' own ``generate``? (The baseline every speedup divides by.)

Same model, prompts, batch and sampling settings (no CFG: ``generate`` has no CFG stream); warm-up, then
``repeats`` timed passes in which the two take turns on every batch (:class:`hawkspec.evaluation.Evaluation`, batch
``b`` seeded ``batch_generator(seed, b)``); medians reported with the spread of the passes, and a warning when they
spread or the machine was busy. Writes ``results.json`` and prints a table.
The modes are ``hawkspec-eval``'s (:class:`~hawkspec.decoding.static.ExecutionMode`, the same two keys):
``compile=none`` compares eager with eager (ours: the static cache; theirs: ``cache_implementation="static"``),
``compile=forward`` compiled with compiled (our forwards compiled vs transformers' own compile of ``generate``),
``cuda_graphs=true`` (CUDA) CUDA graphs with CUDA graphs (ours: each step recorded and replayed; theirs:
``generate`` compiled with ``mode="reduce-overhead"``, which also compiles the kernels with inductor).

    python experiments/bench_ar.py num_prompts=8 batch_size=8 repeats=5 out=outputs/bench/ar_vs_generate.json
    python experiments/bench_ar.py compile=forward out=outputs/bench/ar_vs_generate_compiled.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.data.procedural import ProceduralDataset
from hawkspec.decoding.ar import ARDecoder
from hawkspec.backbones.hf_reference import hf_generate
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import ExecutionMode
from hawkspec.evaluation import Evaluation

DEFAULTS = {"num_prompts": 8, "batch_size": 8, "repeats": 5, "top_k": 128, "temperature": 1.0, "seed": 0,
            "backbone_path": None, "device": "cpu", "compile": "none", "cuda_graphs": False,
            "out": "outputs/bench/ar_vs_generate.json"}


def main() -> dict:
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_dotlist(sys.argv[1:]))
    if cfg.compile not in ("none", "forward") or (cfg.cuda_graphs and cfg.compile != "none"):
        raise ValueError(f"compile must be none or forward (cuda_graphs=true with compile=none), got "
                         f"compile={cfg.compile!r} cuda_graphs={cfg.cuda_graphs}")
    bb = TinyBackbone.from_pretrained(cfg.backbone_path).to(cfg.device).eval()
    mode = ExecutionMode(cfg.compile, cuda_graphs=bool(cfg.cuda_graphs))  # eval.compile / eval.cuda_graphs
    theirs_mode = "graphs" if cfg.cuda_graphs else {"none": "static", "forward": "forward"}[cfg.compile]
    ds = ProceduralDataset(cfg.num_prompts, seed=1234)
    prompts = [ds[i]["caption"] for i in range(cfg.num_prompts)]
    s = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, cfg_scale=1.0)

    ours = ARDecoder(bb, s, name="hawkspec_ar", mode=mode)

    class Theirs:
        def generate(self, batch, generator):
            torch.manual_seed(generator.initial_seed())  # generate draws from the global generator
            return hf_generate(bb, batch, s, compile=theirs_mode)

    # the two take turns on every batch, so the machine's drift slows both alike; batch b: batch_generator(seed, b)
    timing = Evaluation(bb, {"hawkspec_ar": ours, "transformers_generate": Theirs()}, prompts, seed=cfg.seed,
                        batch_size=cfg.batch_size, device=cfg.device, repeats=cfg.repeats,
                        baseline="hawkspec_ar").time()
    times = {k: [t / len(prompts) for t in v] for k, v in timing.seconds.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "backbone": bb.name, "revision": bb.revision, "num_prompts": len(prompts), "batch_size": cfg.batch_size,
        "device": cfg.device if cfg.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "threads": torch.get_num_threads(), "compile": cfg.compile, "cuda_graphs": bool(cfg.cuda_graphs), "sampling": {"temperature": s.temperature, "top_k": s.top_k, "cfg_scale": 1.0},
        "seed": cfg.seed, "seconds_per_image": med, "all_runs": times,
        "pass_spread": {k: timing.spread(k) for k in times}, "timing": timing.describe(),
        "ratio_ours_over_generate": med["hawkspec_ar"] / med["transformers_generate"],
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=1))
    print(f"| runner | s/image (median of {cfg.repeats}) | pass spread |\n|---|---|---|")
    for k, v in med.items():
        spread = result["pass_spread"][k]
        print(f"| {k} | {v:.4f} | {'n/a' if spread is None else f'{spread:.1%}'} |")
    for warning in result["timing"]["warnings"]:
        print(f"**Timing warning**: {warning}.")
    print(f"ours / generate = {result['ratio_ours_over_generate']:.3f} (must be <= 1.10) -> {cfg.out}")
    return result


if __name__ == "__main__":
    main()
