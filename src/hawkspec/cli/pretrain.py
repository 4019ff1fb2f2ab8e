"""``hawkspec-pretrain``: train the embedded tiny model (VQ codebook, then transformer) from scratch."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.cli.common import CONF_PATH, instantiate, instantiate_loggers, task
from hawkspec.cli.validate import validate_pretrain
from hawkspec.io import copy_dir
from hawkspec.data.procedural import VOCAB_WORDS, ProceduralDataset, caption
from hawkspec.data.render import save_grid
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.metrics.captions import parse_caption
from hawkspec.metrics.evaluator import TinyEvaluator
from hawkspec.metrics.quality import caption_alignment
from hawkspec.training.pretrain import TinyPretrainModule
from hawkspec.training.pretrain_data import PretrainDataModule, render_images
from hawkspec.vq.patch_vq import PatchVQ

log = logging.getLogger("hawkspec")


@task
def run(cfg: DictConfig) -> dict:
    validate_pretrain(cfg)
    out_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    t0 = time.perf_counter()
    d = cfg.data
    if d.image_size % cfg.vq.patch_size:
        raise ValueError(f"data.image_size={d.image_size} must be a multiple of vq.patch_size={cfg.vq.patch_size}")
    grid_side = d.image_size // cfg.vq.patch_size

    log.info("Rendering %d training images", d.train_size)
    train_images = render_images(d.train_size, cfg.seed, d.image_size)
    log.info("Fitting the VQ codebook (%d codes, k-means)", cfg.vq.num_codes)
    vq = PatchVQ(num_codes=cfg.vq.num_codes, patch_size=cfg.vq.patch_size)
    vq_stats = vq.fit(train_images[0][: cfg.vq.fit_images], iters=cfg.vq.iters, seed=cfg.seed)
    log.info("VQ: %s", vq_stats)

    log.info("Instantiating backbone <hawkspec.backbones.tiny.TinyBackbone>")
    backbone = TinyBackbone.build(list(VOCAB_WORDS), vq, rows=grid_side, cols=grid_side, seed=cfg.seed, **cfg.model)
    datamodule = PretrainDataModule(
        vq, backbone.layout, train_size=d.train_size, val_size=d.val_size, seed=cfg.seed,
        image_size=d.image_size, batch_size=d.batch_size, prompt_dropout=d.prompt_dropout,
        num_workers=d.num_workers, train_images=train_images,
    )
    module = TinyPretrainModule(
        backbone, optimizer=instantiate(cfg.optimizer, "optimizer"),
        scheduler=instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
    )
    trainer: L.Trainer = instantiate(cfg.trainer, "trainer", logger=instantiate_loggers(cfg.get("logger")))
    trainer.fit(module, datamodule=datamodule)
    val = trainer.validate(module, datamodule=datamodule, verbose=False)
    train_seconds = time.perf_counter() - t0

    backbone.eval()
    model_dir = out_dir / "tiny"
    backbone.save_pretrained(model_dir)
    backbone = TinyBackbone.from_pretrained(model_dir)  # what users will load, revision included

    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    prompts = datamodule.val_captions[: cfg.report.num_prompts]
    gen = ar_generate(backbone, prompts, sampling, torch.Generator().manual_seed(cfg.seed), track_entropy=True)
    save_grid(out_dir / "samples.png", list(backbone.decode_codes(gen.codes)), prompts)
    alignment = _alignment_report(backbone, sampling, cfg)
    report = {
        "val_loss": float(val[0]["val/loss"]) if val else None,
        "mean_entropy_nats": gen.mean_entropy,
        "sampling": OmegaConf.to_container(cfg.sampling),
        "vq": vq_stats,
        "parameters": sum(p.numel() for p in backbone.lm_parameters()),
        "revision": backbone.revision,
        "seconds": round(train_seconds, 1),
        "alignment": alignment,
    }
    (model_dir / "pretrain_report.json").write_text(json.dumps(report, indent=1))
    log.info("Pretraining report: %s", json.dumps(report))
    if cfg.export_dir:  # atomic; a folder hawkspec did not write is refused (checked at start-up too)
        copy_dir(model_dir, cfg.export_dir, "export_dir", bool(cfg.get("overwrite", False)))
        log.info("Exported the model to %s", cfg.export_dir)
    return report


def _alignment_report(backbone: TinyBackbone, sampling: SamplingConfig, cfg: DictConfig) -> dict | None:
    """AR samples of ``report.alignment_prompts`` held-out captions (data seed + 1, the validation split's) scored by
    the evaluator (``report.evaluator``; null: the shipped one): what the caption asked for, read back per attribute."""
    n = int(cfg.report.get("alignment_prompts", 0) or 0)
    if n <= 0:
        return None
    evaluator = TinyEvaluator.load(cfg.report.get("evaluator"), key="report.evaluator")
    split = ProceduralDataset(n, seed=cfg.seed + 1, image_size=cfg.data.image_size)
    prompts = [caption(split.scene(i)) for i in range(n)]
    codes = []
    for start in tqdm(range(0, n, 32), desc="alignment samples", leave=False):
        gen = ar_generate(backbone, prompts[start : start + 32], sampling,
                          torch.Generator().manual_seed(cfg.seed + start))
        codes.append(gen.codes)
    images = backbone.decode_codes(torch.cat(codes))
    out = caption_alignment(evaluator, images, [parse_caption(p) for p in prompts])
    out["evaluator"] = {"revision": evaluator.revision(), "val_accuracy": evaluator.meta.get("val_accuracy")}
    log.info("Alignment over %d held-out captions: %.3f (shape %.3f, color %.3f, position %.3f)", n,
             out["alignment"], out["alignment_shape"], out["alignment_color"], out["alignment_position"])
    return out


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
