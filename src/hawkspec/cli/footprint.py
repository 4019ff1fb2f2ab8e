"""Memory and disk a backbone needs, computed from its config (no weights loaded, nothing downloaded).

    python -m hawkspec.cli.footprint backbone=lumina_mgpt_768 [backbone.path=/ckpt/Lumina-mGPT-7B-768] \\
        [cache.num_samples=6000 cache.topk=0] [prompt_tokens=64 tree_nodes=64 batch=8] [--json]

Arguments are Hydra overrides of the ``cache`` config (so ``backbone=...``, ``backbone.*``, ``cache.*`` and
``sampling.*`` mean what they mean for ``hawkspec-cache``) plus three of this command's own:
``prompt_tokens`` (text tokens per prompt, default 64), ``tree_nodes`` (the largest verification block,
default 64) and ``batch`` (images decoded together, default 1).

* **Weights**: the parameter count of the transformers model built on the meta device from ``config.json`` (from
  ``backbone.path`` when it is a local folder; for ``lumina_mgpt_*`` without one, transformers' ``ChameleonConfig``
  defaults, which are Chameleon/Lumina-mGPT 7B's architecture), times the bytes of ``backbone.dtype``.
* **KV cache per image**: streams (2 with CFG) x layers x 2 (keys, values) x KV heads x head dim x slots x bytes,
  slots = prompt + image start + body (rows x W) + image end + ``tree_nodes`` (what the backbone reserves once).
* **Hidden-state cache** (``hawkspec-cache``): samples x (rows x W + 1) x hidden x 2 bytes (float16), plus the
  int16 codes and, with ``cache.topk``, float16 probabilities + int16 indices per position; train + val splits.

The model side (the transformers config, the grid, the parameter count) is read by
:mod:`hawkspec.backbones.loading`, behind the backbone boundary; this command adds it up.
"""

from __future__ import annotations

import json
import sys

from hawkspec.backbones.loading import count_parameters, grid_of, model_config

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OWN_KEYS = {"prompt_tokens": 64, "tree_nodes": 64, "batch": 1}


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def footprint(cfg, prompt_tokens: int = 64, tree_nodes: int = 64, batch: int = 1) -> dict:
    """Every figure of the module docstring, from a composed ``cache`` config."""
    b = cfg.backbone
    config, source = model_config(b)
    rows, cols, W, start = grid_of(b, config)
    body = rows * W
    dtype = str(b.get("dtype", "float32"))
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"backbone.dtype={dtype} is not one of {sorted(DTYPE_BYTES)}")
    nbytes = DTYPE_BYTES[dtype]
    layers, hidden = config.num_hidden_layers, config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    cfg_scale = float(cfg.sampling.cfg_scale)  # LlamaGen guides only above 1 (sampling.cfg_off_below_one)
    guided = cfg_scale > 1.0 if cfg.sampling.get("cfg_off_below_one", False) else cfg_scale != 1.0
    streams = 2 if guided else 1
    slots = prompt_tokens + start + body + 1 + tree_nodes
    per_slot = layers * 2 * kv_heads * head_dim * nbytes
    params = count_parameters(config)
    c = cfg.cache
    samples = int(c.num_samples) + int(c.val_samples)
    positions = body + 1
    topk = int(c.topk)
    per_sample = positions * hidden * 2 + body * 2 + (positions * topk * (2 + 2) if topk else 0)
    max_len = getattr(config, "max_position_embeddings", None)
    return {
        "backbone": str(b.get("name") or b.get("_target_")), "config_from": source, "dtype": dtype,
        "grid": {"rows": rows, "cols": cols, "tokens_per_row": W, "body_tokens": body},
        "parameters": params, "weights_bytes": params * nbytes,
        "cfg_streams": streams, "kv_slots_per_stream": slots, "kv_bytes_per_slot": per_slot,
        "kv_bytes_per_image": streams * slots * per_slot, "kv_bytes_per_batch": batch * streams * slots * per_slot,
        "batch": batch, "prompt_tokens": prompt_tokens, "tree_nodes": tree_nodes,
        "sequence_fits_context": None if max_len is None else prompt_tokens + start + body + 1 <= max_len,
        "max_position_embeddings": max_len,
        "cache_samples": samples, "cache_positions_per_sample": positions, "cache_topk": topk,
        "cache_bytes_per_sample": per_sample, "cache_bytes": samples * per_sample,
    }


def markdown(f: dict) -> str:
    g = f["grid"]
    lines = [
        f"Footprint of {f['backbone']} ({f['dtype']}; config: {f['config_from']})", "",
        "| what | how | size |", "|---|---|---|",
        f"| weights | {f['parameters']:,} parameters x {DTYPE_BYTES[f['dtype']]} B | {_gib(f['weights_bytes'])} |",
        f"| KV cache per image | {f['cfg_streams']} stream(s) x {f['kv_slots_per_stream']:,} slots "
        f"({f['prompt_tokens']} prompt + image start + {g['rows']}x{g['tokens_per_row']} body + end + "
        f"{f['tree_nodes']} tree) x {f['kv_bytes_per_slot']:,} B | {_gib(f['kv_bytes_per_image'])} |",
        f"| KV cache per batch of {f['batch']} | | {_gib(f['kv_bytes_per_batch'])} |",
        f"| hidden-state cache | {f['cache_samples']:,} samples x {f['cache_positions_per_sample']:,} positions x "
        f"(hidden fp16{' + top-%d' % f['cache_topk'] if f['cache_topk'] else ''}) = "
        f"{f['cache_bytes_per_sample']:,} B/sample | {_gib(f['cache_bytes'])} |",
    ]
    if f["sequence_fits_context"] is False:
        lines += ["", f"WARNING: prompt + image ({f['prompt_tokens']} + {g['body_tokens']} + 4 tokens) exceeds "
                      f"max_position_embeddings={f['max_position_embeddings']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    from hawkspec.cli.common import CONF_DIR

    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    own = dict(OWN_KEYS)
    overrides = []
    for a in argv:
        if a == "--json":
            continue
        key = a.split("=", 1)[0]
        if key in own:
            own[key] = int(a.split("=", 1)[1])
        else:
            overrides.append(a)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("cache", overrides=overrides)
    f = footprint(cfg, **own)
    print(json.dumps(f, indent=1) if as_json else markdown(f))
    return f


if __name__ == "__main__":
    main()
