"""``hawkspec-train``: train Medusa / Hawk draft heads on a hidden-state cache; save the heads alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from hawkspec.backbones.base import Backbone
from hawkspec.cli.common import CONF_DIR, instantiate, instantiate_loggers, task
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.training.checkpoint import VAL_METRICS, HeadsCheckpoint
from hawkspec.training.heads import HeadTrainingModule
from hawkspec.training.seen_keys import SeenKeysRecorder

log = logging.getLogger("hawkspec")


def heads_config(cfg: DictConfig) -> HeadsConfig:
    """``HeadsConfig`` from the ``heads`` group, checked before anything heavy is loaded."""
    try:
        return HeadsConfig(**cfg.heads).validate()
    except TypeError as e:
        raise ValueError(f"bad key in `heads` (expected num_horizontal, vertical, vsd, num_layers): {e}") from e


@task
def run(cfg: DictConfig) -> dict:
    config = heads_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    backbone: Backbone = instantiate(cfg.backbone, "backbone")
    config.validate(backbone.grid.rows)
    distill = cfg.loss.distill_weight > 0
    datamodule = instantiate(cfg.data, "data", identity=backbone.identity(), topk=distill)
    kind = "Hawk" if config.vertical else "Medusa"
    log.info("Building %s draft heads %s for backbone %s", kind, config, backbone.name)
    heads = DraftHeads.for_backbone(config, backbone)
    grid = backbone.grid
    del backbone  # the heads carry the frozen LM head rows; the transformer is not needed to train them
    module = HeadTrainingModule(
        heads, grid, optimizer=instantiate(cfg.optimizer, "optimizer"),
        scheduler=instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        warmup_ratio=cfg.warmup_ratio, **cfg.loss,
    )
    out_dir = Path(cfg.paths.output_dir)
    checkpoint = HeadsCheckpoint(out_dir / "heads", cfg.export_dir)
    callbacks = [checkpoint] + ([SeenKeysRecorder(out_dir / "seen_keys")] if cfg.record_keys else [])
    trainer: L.Trainer = instantiate(cfg.trainer, "trainer", logger=instantiate_loggers(cfg.get("logger")),
                                     callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)
    if checkpoint.saved_step != trainer.global_step and datamodule.val_manifest is not None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # final metrics; saves the heads
    if checkpoint.saved_step != trainer.global_step:  # no validation data
        checkpoint.save(trainer, module)
    summary = {"heads_dir": str(out_dir / "heads"), "export_dir": cfg.export_dir}
    if trainer.is_global_zero and (out_dir / "heads" / VAL_METRICS).is_file():
        report = json.loads((out_dir / "heads" / VAL_METRICS).read_text())
        summary["metrics"] = report["metrics"]
        table = ", ".join(f"{r['name']} {r['top1']:.3f}" for r in report["heads"] if r["top1"] is not None)
        print(f"draft heads top-1 (val): {table} -> {cfg.export_dir or out_dir / 'heads'}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
