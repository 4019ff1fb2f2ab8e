"""``hawkspec-generate``: sample images with plain AR decoding and write a captioned PNG grid."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
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

    decodable, why = backbone.can_decode()
    images, codes, seconds = [], [], 0.0
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    for batch in tqdm(batches, desc="generate (AR)", unit="batch"):
        t = time.perf_counter()
        out = ar_generate(backbone, batch, sampling, generator, progress=len(batches) == 1)
        seconds += time.perf_counter() - t
        codes.append(out.codes.cpu())
        if decodable:
            images.extend(backbone.decode_codes(out.codes))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = torch.cat(codes)  # (N, rows, cols) code grids, always saved
    torch.save(codes, out_dir / "codes.pt")
    np.save(out_dir / "codes.npy", codes.numpy())
    grid_path = save_grid(out_dir / "grid.png", images, prompts, ncols=cfg.grid.ncols, scale=cfg.grid.scale) \
        if decodable else None
    summary = {
        "backbone": backbone.name,
        "num_images": len(prompts),
        "seconds_per_image": seconds / len(prompts),
        "forwards_per_image": out.forwards,
        "grid": str(grid_path) if grid_path else None,
        "codes": str(out_dir / "codes.pt"),
        "images_decoded": decodable,
        "not_decoded_because": None if decodable else why,
    }
    atomic_write_json(out_dir / "generate.json", summary)
    where = grid_path if decodable else f"{out_dir / 'codes.pt'} (and .npy)"
    print(f"AR: {summary['seconds_per_image']:.3f} s/image over {len(prompts)} images -> {where}")
    if not decodable:
        log.warning("images were not decoded: %s", why)
        print(f"Images were NOT decoded ({why}); the code grids are saved in {out_dir / 'codes.pt'} and .npy.")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
