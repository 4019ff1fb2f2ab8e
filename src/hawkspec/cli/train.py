"""``hawkspec-train``: train a draft model (Medusa / Hawk heads, EAGLE, ...) on a hidden-state cache; save it alone.

The training module is the ``_target_`` of the ``heads`` group (``conf/heads/*.yaml``), called with the backbone,
the optimiser and scheduler factories and ``warmup_ratio`` besides the group's own keys: a new draft model is its
module and one YAML, no change here.

Resumable: Lightning checkpoints go to ``<run>/checkpoints`` (``last.ckpt`` at every epoch end, or every
``checkpoint.every_n_train_steps``); with ``ckpt_path=last`` (the default) a rerun into the same run folder
(``hydra.run.dir``) continues from there. The exported heads are the best by validation
(:class:`hawkspec.training.checkpoint.HeadsCheckpoint`).
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from hawkspec.backbones.base import Backbone
from hawkspec.cli.common import CONF_PATH, instantiate, instantiate_loggers, task
from hawkspec.cli.validate import validate_train
from hawkspec.training.checkpoint import VAL_METRICS, HeadsCheckpoint
from hawkspec.training.seen_keys import SeenKeysRecorder

log = logging.getLogger("hawkspec")


# what the CLI passes to every training module's factory besides the `heads` group's keys
BUILD_ARGS = ("backbone", "optimizer", "scheduler", "warmup_ratio")


def training_factory(cfg: DictConfig):
    """The training module's factory named by ``heads._target_``, with the group's keys checked against its
    signature before anything heavy is loaded (a typo names the key)."""
    target = cfg.heads.get("_target_")
    if not target:
        raise ValueError("`heads` has no `_target_`: name the training module's factory, e.g. "
                         "hawkspec.training.heads.HeadTrainingModule.for_backbone (see conf/heads/*.yaml)")
    try:
        factory = hydra.utils.get_method(str(target))
    except Exception as e:
        raise ValueError(f"heads._target_={target} cannot be imported: {e}") from e
    keys = [k for k in cfg.heads if not str(k).startswith("_")]
    taken = sorted(set(keys) & set(BUILD_ARGS))
    if taken:
        raise ValueError(f"bad key in `heads`: {taken} are passed by hawkspec-train itself")
    try:
        inspect.signature(factory).bind_partial(**dict.fromkeys(keys))
    except TypeError as e:
        raise ValueError(f"bad key in `heads` for {target}: {e}") from e
    return factory


def resume_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` (a file), the run's ``last.ckpt`` for ``last``, or None."""
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        last = ckpt_dir / "last.ckpt"
        if not last.is_file():
            return None
        log.info("Resuming from %s (ckpt_path=last; ckpt_path=null starts afresh)", last)
        return str(last)
    return str(ckpt) if ckpt else None


def checkpoint_callback(cfg: DictConfig, ckpt_dir: Path) -> ModelCheckpoint:
    """Lightning's own checkpoint of the whole training state (weights, optimiser, scheduler, loops): only
    ``last.ckpt``, at every epoch end or every ``checkpoint.every_n_train_steps``."""
    every = (cfg.get("checkpoint") or {}).get("every_n_train_steps")
    return ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                           every_n_train_steps=every, save_on_train_epoch_end=True, enable_version_counter=False)


@task
def run(cfg: DictConfig) -> dict:
    validate_train(cfg)
    training_factory(cfg)
    L.seed_everything(cfg.seed, workers=True)
    backbone: Backbone = instantiate(cfg.backbone, "backbone")
    optimizer = instantiate(cfg.optimizer, "optimizer")
    scheduler = instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    module: L.LightningModule = instantiate(cfg.heads, "heads", backbone=backbone, optimizer=optimizer,
                                            scheduler=scheduler, warmup_ratio=cfg.warmup_ratio)
    datamodule = instantiate(cfg.data, "data", identity=backbone.identity(),
                             topk=bool(getattr(module, "needs_topk", False)))
    del backbone  # the module carries the frozen LM head rows; the transformer is not needed to train it
    out_dir = Path(cfg.paths.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    checkpoint = HeadsCheckpoint(out_dir / "heads", cfg.export_dir, overwrite=bool(cfg.get("overwrite", False)))
    callbacks = [checkpoint, checkpoint_callback(cfg, ckpt_dir)]
    callbacks += [SeenKeysRecorder(out_dir / "seen_keys")] if cfg.record_keys else []
    trainer: L.Trainer = instantiate(cfg.trainer, "trainer", logger=instantiate_loggers(cfg.get("logger")),
                                     callbacks=callbacks, enable_checkpointing=True)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg, ckpt_dir))
    except SIGTERMException:  # Lightning's is a SystemExit with code 0: a killed run must not look like a success
        log.error("SIGTERM at step %d: rerun with hydra.run.dir=%s to resume from %s", trainer.global_step, out_dir,
                  ckpt_dir / "last.ckpt")
        raise SystemExit(128 + signal.SIGTERM) from None
    if checkpoint.saved_step != trainer.global_step and datamodule.val_manifest is not None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # final metrics; saves the heads
    if checkpoint.saved_step != trainer.global_step:  # no validation data
        checkpoint.save(trainer, module)
    summary = {"heads_dir": str(out_dir / "heads"), "export_dir": cfg.export_dir, "best": checkpoint.best,
               "exported": checkpoint.exported, "global_step": trainer.global_step}
    if trainer.is_global_zero and (out_dir / "heads" / VAL_METRICS).is_file():
        report = json.loads((out_dir / "heads" / VAL_METRICS).read_text())
        summary["metrics"] = report["metrics"]
        table = ", ".join(f"{r['name']} {r['top1']:.3f}" for r in report["heads"] if r["top1"] is not None)
        best = checkpoint.best or {}
        where = cfg.export_dir if checkpoint.exported else out_dir / "heads"
        print(f"draft heads top-1 (val): {table} (best {best.get('monitor')} {best.get('score')} at epoch "
              f"{best.get('epoch')}) -> {where}")
        if checkpoint.exported is False:
            print(f"export_dir={cfg.export_dir} kept its better heads; add overwrite=true to replace them")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
