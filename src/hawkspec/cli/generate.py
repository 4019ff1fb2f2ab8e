"""``hawkspec-generate``: sample images with plain AR decoding and write a captioned PNG grid."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone
from hawkspec.cli.common import CONF_PATH, instantiate, load_prompts, task
from hawkspec.cli.validate import validate_generate
from hawkspec.data.render import save_grid
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.io import atomic_write_json

log = logging.getLogger("hawkspec")


@task
def run(cfg: DictConfig) -> dict:
    validate_generate(cfg)
    prompts = load_prompts(cfg.get("prompts"), cfg.get("prompts_file"))
    L.seed_everything(cfg.seed, workers=True)
    backbone: Backbone = instantiate(cfg.backbone, "backbone").to(cfg.device).eval()
    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    backbone.check_prompt_lengths(backbone.encode(prompts))
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)

    images, seconds = [], 0.0
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    for batch in tqdm(batches, desc="generate (AR)", unit="batch"):
        t = time.perf_counter()
        out = ar_generate(backbone, batch, sampling, generator, progress=len(batches) == 1)
        seconds += time.perf_counter() - t
        images.extend(backbone.decode_codes(out.codes))
    out_dir = Path(cfg.paths.output_dir)
    grid_path = save_grid(out_dir / "grid.png", images, prompts, ncols=cfg.grid.ncols, scale=cfg.grid.scale)
    summary = {
        "backbone": backbone.name,
        "num_images": len(prompts),
        "seconds_per_image": seconds / len(prompts),
        "forwards_per_image": out.forwards,
        "grid": str(grid_path),
    }
    atomic_write_json(out_dir / "generate.json", summary)
    print(f"AR: {summary['seconds_per_image']:.3f} s/image over {len(prompts)} images -> {grid_path}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
