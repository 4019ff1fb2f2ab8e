"""``hawkspec-quality``: train the evaluator that ``hawkspec-eval`` scores images with (prompt alignment, and the
FID / diversity feature space when no Inception weights are available); report its held-out accuracy."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.cli.common import CONF_PATH, instantiate, instantiate_loggers, task
from hawkspec.cli.validate import validate_pretrain
from hawkspec.io import staged_dir
from hawkspec.metrics.evaluator import META, WEIGHTS, TinyEvaluator
from hawkspec.metrics.evaluator_training import (
    EvaluatorModule,
    accuracy,
    class_balance,
    backbone_tokenizer,
    render_split,
    seed_worker_free_loader,
    training_tensors,
)

log = logging.getLogger("hawkspec")


def image_side(backbone: Backbone) -> int:
    """Pixel side of the backbone's decoded images."""
    g = backbone.grid
    return int(backbone.decode_codes(torch.zeros(1, g.rows, g.cols, dtype=torch.long)).shape[-1])


@task
def run(cfg: DictConfig) -> dict:
    d = cfg.data
    for key in ("train_size", "val_size", "batch_size"):
        if d[key] < 1:
            raise ValueError(f"data.{key} must be >= 1, got {d[key]}")
    validate_pretrain(cfg, "evaluator")  # the export folder and the run folder
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    backbone: Backbone = instantiate(cfg.backbone, "backbone")
    if backbone.name != "tiny":
        raise ValueError(f"backbone `{backbone.name}`: the evaluator is trained on the embedded procedural data "
                         "through the tiny model's VQ (use backbone=tiny)")
    vq = backbone_tokenizer(backbone)
    side = image_side(backbone)
    t0 = time.perf_counter()
    log.info("Rendering %d train + %d val procedural images at %d px, through the VQ", d.train_size, d.val_size, side)
    train = render_split(d.train_size, d.train_seed, side, vq, d.code_noise)
    val = render_split(d.val_size, d.val_seed, side, vq, 0.0)
    val_noisy = render_split(d.val_size, d.val_seed, side, vq, d.code_noise)
    data_seconds = time.perf_counter() - t0

    model = TinyEvaluator(cfg.model.feature_dim, cfg.model.image_size)
    log.info("Instantiating evaluator %s (%d parameters)", type(model).__name__, sum(p.numel() for p in model.parameters()))
    module = EvaluatorModule(model, instantiate(cfg.optimizer, "optimizer"),
                             instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None)
    trainer: L.Trainer = instantiate(cfg.trainer, "trainer", logger=instantiate_loggers(cfg.get("logger")))
    t1 = time.perf_counter()
    trainer.fit(module, seed_worker_free_loader(training_tensors(train), d.batch_size, True, cfg.seed),
                seed_worker_free_loader(torch.utils.data.TensorDataset(val.vq, val.labels), 512, False, cfg.seed))
    train_seconds = time.perf_counter() - t1

    model.eval()
    scale = model.calibrate(val.raw)  # FID features of order 1
    report = {
        "val_accuracy": {"rendered": accuracy(model, val.raw, val.labels), "vq": accuracy(model, val.vq, val.labels),
                         "vq_code_noise": accuracy(model, val_noisy.vq, val_noisy.labels)},
        "majority_class": class_balance(val),
        "feature_scale": scale,
        "vq_backbone": {"name": backbone.name, "revision": backbone.revision},
        "train": {"data": OmegaConf.to_container(d), "model": OmegaConf.to_container(cfg.model),
                  "optimizer": OmegaConf.to_container(cfg.optimizer), "max_epochs": cfg.trainer.get("max_epochs"),
                  "steps": trainer.global_step, "seed": cfg.seed, "threads": torch.get_num_threads(),
                  "seconds": {"data": round(data_seconds, 1), "fit": round(train_seconds, 1)}},
        "command": "hawkspec-quality " + " ".join(_overrides()),
    }
    out_dir = Path(cfg.paths.output_dir) / "evaluator"
    model.save(out_dir, report)
    if cfg.export_dir:  # atomic; a folder hawkspec did not write is refused (checked at start-up too)
        with staged_dir(cfg.export_dir, "export_dir", bool(cfg.get("overwrite", False))) as tmp:
            for name in (WEIGHTS, META):
                shutil.copy2(out_dir / name, tmp / name)
    table = ["| attribute | rendered | through VQ | VQ + code noise | majority class |", "|---|---:|---:|---:|---:|"]
    acc = report["val_accuracy"]
    for k in acc["rendered"]:
        table.append(f"| {k} | {acc['rendered'][k]:.3f} | {acc['vq'][k]:.3f} | {acc['vq_code_noise'][k]:.3f} | "
                     f"{report['majority_class'][k]:.3f} |")
    (Path(cfg.paths.output_dir) / "evaluator.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"evaluator -> {cfg.export_dir or out_dir} (data {data_seconds:.0f} s, fit {train_seconds:.0f} s, "
          f"{torch.get_num_threads()} threads)")
    return {"evaluator_dir": str(out_dir), "export_dir": cfg.export_dir, **report}


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]
    except ValueError:  # not under Hydra
        return []


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="quality")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
