"""What a verification forward costs: one forward of T tree tokens x both CFG streams against one AR step, and
what that means for each decoder's speedup.

For T in 1, 8, 16, 32, 64, 128 the backbone forwards a chain-shaped tree block of T nodes (both CFG streams,
4-D tree mask, mid-image context) and compacts it away; the AR step is one linear token. Medians over
``repeats`` after ``warmup``. With ``results=`` (a ``hawkspec-eval`` results.json, e.g. from ``make bench``) it
projects each decoder's speedup as

    projected = step_compression x t_AR-step / t_verify(T = the decoder's tree nodes)

i.e. what the decoder would reach if everything outside the forward were free -- the bound that
``efficiency`` in ``make bench`` measures the engine against. Writes ``<out>.json`` and ``<out>.md``.

    python experiments/verify_cost.py                                  # the tiny model on this CPU
    python experiments/verify_cost.py results=outputs/bench/results.json out=experiments/results/projection
    python experiments/verify_cost.py model=chameleon_7b device=cuda dtype=bfloat16   # a 7B-shaped Lumina-mGPT
    python experiments/verify_cost.py model=chameleon_7b device=cuda dtype=bfloat16 graphs=true  # + CUDA graphs
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.metrics.sweep import built_of

DEFAULTS = {"model": "tiny", "device": "cpu", "dtype": "float32", "sizes": [1, 8, 16, 32, 64, 128], "graphs": False,
            "context": None, "batch_size": 1, "warmup": 3, "repeats": 20, "results": None, "layers": 32,
            "out": "outputs/verify_cost/verify_cost"}


def chameleon_7b_shaped(device: str, dtype: torch.dtype, layers: int = 32) -> Backbone:
    """Lumina-mGPT 7B's shapes (h 4096, 32 layers, 32 heads, MLP 11008, 8,192 codes, 48x48 + eol) with random
    weights: what a verification forward costs at 7B, without the weights."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from hawkspec.backbones.chameleon import BOS_TOKEN, PAD_TOKEN, ChameleonBackbone, tiny_vocabulary

    vocab, tokenizer = tiny_vocabulary(8192)
    config = ChameleonConfig(
        vocab_size=max(len(vocab), 65536), hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, vocabulary_map=vocab,
        pad_token_id=vocab[PAD_TOKEN], bos_token_id=vocab[BOS_TOKEN], attn_implementation="sdpa",
        vq_config=dict(embed_dim=32, num_embeddings=8192, latent_channels=32, resolution=768, base_channels=32,
                       channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[]),  # 16x: 48x48
    )
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = ChameleonForConditionalGeneration(config).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(previous)
    return ChameleonBackbone(model, tokenizer, (768, 768), name="lumina-mgpt-7b-shaped-random",
                             vqgan_reason="random weights: nothing to decode").to(device)


def load(cfg) -> Backbone:
    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny":
        from hawkspec.backbones.tiny import TinyBackbone

        return TinyBackbone.from_pretrained().to(device=cfg.device, dtype=dtype).eval()
    if cfg.model == "chameleon_7b":
        return chameleon_7b_shaped(cfg.device, dtype, int(cfg.layers))
    raise ValueError(f"model must be tiny or chameleon_7b, got {cfg.model!r}")


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def measure(bb: Backbone, cfg) -> dict:
    """Median seconds of one AR step and of one verification forward per tree size."""
    B, dev = int(cfg.batch_size), cfg.device
    context = int(cfg.context or bb.grid.length // 2)
    prompts = ["a large red circle in the center on a plain white background"] * B
    state, _ = bb.prefill(bb.encode(prompts), cfg=True, reserve=context + max(cfg.sizes) + cfg.warmup + cfg.repeats)
    codes = torch.randint(0, bb.num_codes, (B, bb.grid.rows, bb.grid.cols))
    body = bb.body_ids(codes.to(bb.code_token_ids.device))  # (B, L)
    bb.forward(state, body[:, :context].repeat(2, 1))
    S = state.streams
    out = {"context": context, "streams": S, "batch_size": B}

    def timed(fn) -> float:
        times = []
        for i in range(cfg.warmup + cfg.repeats):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            if i >= cfg.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def graphed(fn):
        """``fn`` recorded once as a CUDA graph (after warm-up on a side stream): its replay."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    modes = ["eager", "graphs"] if cfg.graphs else ["eager"]
    tok = body[:, context : context + 1].repeat(S, 1)
    one, none = torch.ones(1, 1, dtype=torch.bool, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    keep, count = torch.zeros((S * B, 1), dtype=torch.long, device=dev), torch.zeros(S * B, dtype=torch.long, device=dev)

    def ar_step():  # one linear token, then rewind it (a prefix compaction of a 1-node block keeps nothing)
        bb.forward(state, tok, tree_mask=one, depth=none)
        bb.compact(state, keep, count, prefix=True)

    for mode in modes:
        out[mode] = {"ar_step": timed(ar_step if mode == "eager" else graphed(ar_step)), "verify": {}}
    g = torch.Generator().manual_seed(0)
    for T in cfg.sizes:
        draws = torch.randint(0, bb.num_codes, (B, T), generator=g).to(bb.code_token_ids.device)
        nodes = bb.code_token_ids[draws].repeat(S, 1)  # T random codes (any T, past the image's end too)
        mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        depth = torch.arange(T, device=dev)

        def verify():
            bb.forward(state, nodes, tree_mask=mask, depth=depth)
            bb.compact(state, keep, count, prefix=True)

        for mode in modes:
            out[mode]["verify"][T] = timed(verify if mode == "eager" else graphed(verify))
    out.update(out["graphs" if cfg.graphs else "eager"])  # the projection uses the fastest mode measured
    out["mode"] = modes[-1]
    return out


def curve_table(cost: dict) -> list[str]:
    """The verify-cost curve as markdown rows: per tree size, seconds per forward and x the AR step, per mode."""
    modes = [m for m in ("eager", "graphs") if m in cost]
    lines = ["| tree tokens | " + " | ".join(f"{m}: ms per forward | {m}: x AR step" for m in modes) + " |",
             "|---|" + "---|---|" * len(modes)]
    for T in ["ar"] + list(cost["eager"]["verify"]):
        cells = []
        for m in modes:
            sec = cost[m]["ar_step"] if T == "ar" else cost[m]["verify"][T]
            cells.append(f"{sec * 1e3:.3f} | {sec / cost[m]['ar_step']:.2f}")
        lines.append(f"| {'AR step (1)' if T == 'ar' else T} | " + " | ".join(cells) + " |")
    return lines


def interpolate(curve: dict, T: int) -> float:
    """Seconds of a T-token forward, linear between the measured sizes (clamped at the ends)."""
    curve = {int(k): v for k, v in curve.items()}  # sizes are strings once read back from JSON
    sizes = sorted(curve)
    lo = max((s for s in sizes if s <= T), default=sizes[0])
    hi = min((s for s in sizes if s >= T), default=sizes[-1])
    if hi == lo:
        return curve[lo]
    return curve[lo] + (curve[hi] - curve[lo]) * (T - lo) / (hi - lo)


def project(cost: dict, results_path: str) -> list[dict]:
    """Each decoder's projected speedup from its measured step compression and tree size."""
    rows = json.loads(Path(results_path).read_text())["rows"]
    out = []
    for r in rows:
        nodes = built_of(r).get("tree_nodes") or 1
        t_tree = cost["ar_step"] if r["decoder"] == "ar" else interpolate(cost["verify"], nodes)
        out.append({"decoder": r["decoder"], "tree_nodes": nodes, "seconds_per_verify": t_tree,
                    "step_compression": r["step_compression"],
                    "projected_speedup": r["step_compression"] * cost["ar_step"] / t_tree,
                    "measured_speedup": r.get("speedup")})
    return out


def main() -> dict:
    cfg = OmegaConf.merge(DEFAULTS, OmegaConf.from_cli(sys.argv[1:]))
    bb = load(cfg)
    cost = measure(bb, cfg)
    device = cfg.device if cfg.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
    report = {"backbone": bb.name, "device": device, "dtype": cfg.dtype, **cost,
              "method": "median of timed forwards after warm-up; both CFG streams; chain-shaped tree mask; "
                        "projected speedup = step_compression x t_AR-step / t_verify(tree nodes), t_verify linear between measured sizes"}
    lines = [f"# Verify cost: {bb.name} on {device}, {cfg.dtype}, context {cost['context']} body tokens, "
             f"batch {cost['batch_size']} x {cost['streams']} streams", ""]
    lines += curve_table(cost)
    lines += ["", "graphs: each forward (+ its compaction) recorded once as a CUDA graph and replayed; eager: launched "
              "op by op. The projection below uses the " + cost["mode"] + " times."]
    if cfg.results:
        report["projection"] = project(cost, cfg.results)
        lines += ["", f"Projected from the step compressions in `{cfg.results}` (the bound if everything outside the "
                  "forward were free):", "",
                  "| decoder | tree nodes | step compression | projected speedup | measured speedup |",
                  "|---|---|---|---|---|"]
        for p in report["projection"]:
            m = "n/a" if p["measured_speedup"] is None else f"{p['measured_speedup']:.2f}x"
            lines.append(f"| {p['decoder']} | {p['tree_nodes']} | {p['step_compression']:.2f} | "
                         f"{p['projected_speedup']:.2f}x | {m} |")
    lines += ["", f"Command: `python experiments/verify_cost.py {' '.join(sys.argv[1:])}`"]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
