"""``hawkspec-eval``: run several decoders on the same prompts and seeds, time them against AR in the same
run, and write ``results.json`` (the contract other tools read), ``results.md`` and image grids."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone
from hawkspec.cli.common import CONF_DIR, instantiate, instantiate_loggers, load_prompts, task
from hawkspec.data.procedural import ProceduralDataset
from hawkspec.data.render import save_grid
from hawkspec.decoding.build import build_decoder, decoder_presets
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.metrics.speed import image_counters, summarize

log = logging.getLogger("hawkspec")


def eval_prompts(cfg: DictConfig) -> list[str]:
    """``eval.prompts_file`` when set, else ``eval.num_prompts`` procedural captions (seeded)."""
    e = cfg.eval
    if e.get("prompts_file"):
        return load_prompts(None, e.prompts_file)[: e.num_prompts]
    if e.num_prompts < 1:
        raise ValueError(f"eval.num_prompts must be >= 1, got {e.num_prompts}")
    ds = ProceduralDataset(e.num_prompts, seed=e.prompt_seed)
    return [ds[i]["caption"] for i in range(e.num_prompts)]


def decoder_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config of decoder ``name``: the run's own ``decoder`` if it has that name, else its preset."""
    if cfg.decoder.get("name") == name:
        return cfg.decoder
    if name not in decoder_presets(CONF_DIR):
        raise ValueError(f"unknown decoder {name!r} in eval.decoders: choose from {decoder_presets(CONF_DIR)}")
    preset = compose(config_name="eval", overrides=[f"decoder={name}"]).decoder
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.decoder = preset  # replaces the node; ${paths...} now resolve against this run
    return run_cfg.decoder


def accept_heatmap(path: Path, maps: torch.Tensor, title: str) -> None:
    """Mean per-position acceptance (rows x cols) as a PNG heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.6))
    im = ax.imshow(maps.float().mean(0).numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("column"), ax.set_ylabel("row")
    fig.colorbar(im, ax=ax, label="P(accepted from a draft)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    cols = ["decoder", "lossless", "acceptance_length", "forwards_per_image", "step_compression",
            "seconds_per_image", "speedup"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@task
def run(cfg: DictConfig) -> dict:
    e = cfg.eval
    names = decoder_presets(CONF_DIR) if e.decoders == "all" else list(e.decoders)
    if not names:
        raise ValueError("eval.decoders is empty: name at least one decoder, e.g. 'eval.decoders=[ar,hawk]'")
    if "ar" not in names:
        names = ["ar"] + names  # speedup is always against AR measured in the same run
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    prompts = eval_prompts(cfg)
    backbone: Backbone = instantiate(cfg.backbone, "backbone").to(cfg.device).eval()
    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    decoders = {}
    for name in names:
        dcfg = decoder_config(cfg, name)
        log.info("Instantiating decoder %s", name)
        decoders[name] = build_decoder(dcfg, backbone, sampling)
    ar_forwards = backbone.grid.length
    batches = [prompts[i : i + e.batch_size] for i in range(0, len(prompts), e.batch_size)]

    def one_pass(dec, keep: bool):
        outs, t0 = [], time.perf_counter()
        for bi, batch in enumerate(batches):
            g = torch.Generator(device=cfg.device).manual_seed(cfg.seed * 100_003 + bi)
            out = dec.generate(batch, g)
            if keep:
                outs.append(out)
        return time.perf_counter() - t0, outs

    for name, dec in decoders.items():  # warm-up
        for batch in batches[: e.warmup_batches]:
            dec.generate(batch, torch.Generator(device=cfg.device).manual_seed(0))
    seconds = {name: [] for name in decoders}
    outputs = {}
    for rep in tqdm(range(max(1, e.repeats)), desc="timed passes"):
        for name, dec in decoders.items():  # interleaved, so drift hits every decoder alike
            dt, outs = one_pass(dec, keep=rep == 0)
            seconds[name].append(dt)
            if rep == 0:
                outputs[name] = outs

    rows = []
    ar_sec = statistics.median(seconds["ar"]) / len(prompts)
    for name, dec in decoders.items():
        outs = outputs[name]
        sec = statistics.median(seconds[name]) / len(prompts)
        row = {"decoder": name, "lossless": bool(dec.lossless),
               **summarize([image_counters(o, ar_forwards) for o in outs], ar_forwards),
               "seconds_per_image": sec, "speedup": ar_sec / sec,
               "seconds_per_pass": seconds[name], "config": dec.describe()}
        codes = torch.cat([o.codes for o in outs])
        images = backbone.decode_codes(codes[: e.grid_images])
        row["grid"] = str(save_grid(out_dir / f"grid_{name}.png", list(images), prompts[: e.grid_images]))
        maps = [o.accept_map for o in outs if o.accept_map is not None]
        if maps:
            accept_heatmap(out_dir / f"accept_map_{name}.png", torch.cat(maps), f"{name}: acceptance by position")
            row["accept_map"] = str(out_dir / f"accept_map_{name}.png")
        torch.save(codes, out_dir / f"codes_{name}.pt")
        rows.append(row)

    results = {"backbone": backbone.name, "revision": backbone.revision, "num_prompts": len(prompts),
               "device": str(cfg.device) if cfg.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
               "batch_size": e.batch_size, "repeats": e.repeats,
               "sampling": OmegaConf.to_container(cfg.sampling), "seed": cfg.seed, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(rows)
    (out_dir / "results.md").write_text(table)
    print(table)
    for lg in instantiate_loggers(cfg.get("logger")):
        for row in rows:
            lg.log_metrics({f"eval/{row['decoder']}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        if hasattr(lg, "log_table"):
            cols = ["decoder", "lossless", "acceptance_length", "forwards_per_image", "step_compression",
                    "seconds_per_image", "speedup"]
            lg.log_table("eval/results", columns=cols, data=[[r[c] for c in cols] for r in rows])
            for row in rows:
                lg.log_image(f"eval/grid_{row['decoder']}", [row["grid"]])
        lg.finalize("success")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
