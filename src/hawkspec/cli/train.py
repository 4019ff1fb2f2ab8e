"""``hawkspec-train``: train a draft model (Medusa / Hawk heads, EAGLE, ...) on a hidden-state cache; save it alone.

The training module is the ``_target_`` of the ``heads`` group (``conf/heads/*.yaml``), called with the backbone,
the optimiser and scheduler factories and ``warmup_ratio`` besides the group's own keys: a new draft model is its
module and one YAML, no change here.

Resumable: Lightning checkpoints go to ``<run>/checkpoints`` (``last.ckpt`` at every epoch end, or every
``checkpoint.every_n_train_steps``); with ``ckpt_path=last`` (the default) a rerun into the same run folder
(``hydra.run.dir``) continues from there. The exported heads are the best by validation
(:class:`hawkspec.training.checkpoint.HeadsCheckpoint`).

A resume is checked before fitting (:func:`check_resume`): a checkpoint whose weights do not fit this run's
``heads`` settings is refused with the settings that differ; one that already reached ``trainer.max_epochs`` (or
``trainer.max_steps``) trains nothing, which is said, and its heads are exported where the run folder or
``export_dir`` has none.
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.cli.common import CONF_PATH, instantiate, instantiate_loggers, task
from hawkspec.cli.validate import validate_train
from hawkspec.training.checkpoint import RUN_RECORD, VAL_METRICS, HeadsCheckpoint, RunRecord, has_heads
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


def heads_choice() -> str | None:
    """The ``heads=`` option of this run (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("heads")


def _flat(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def settings_diff(now: dict, then: dict | None) -> list[str]:
    """``heads=...`` and ``heads.<key>`` settings that differ between this run (``now``) and a checkpoint's
    :class:`RunRecord` (``then``), as readable lines."""
    if not then:
        return []
    lines = []
    if now.get("heads") and then.get("heads") and now["heads"] != then["heads"]:
        lines.append(f"heads={now['heads']} now, heads={then['heads']} in the checkpoint")
    a, b = _flat(now.get("heads_config") or {}, "heads"), _flat(then.get("heads_config") or {}, "heads")
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: {a.get(key, '<unset>')} now, {b.get(key, '<unset>')} in the checkpoint")
    return lines


def check_resume(path: str, module: L.LightningModule, record: dict) -> dict:
    """Read the checkpoint to resume from and refuse it, before fitting, when its weights do not fit ``module``.

    Args:
        path: The checkpoint (``ckpt_path``, or the run's ``last.ckpt``).
        module: The training module built from this run's settings.
        record: This run's :class:`RunRecord` (``heads`` choice and ``heads`` group).

    Returns:
        The checkpoint's ``global_step`` and ``epochs`` (how many epochs it trained through).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the weights have other names or shapes than the module's (naming the checkpoint, the
            settings that differ and ``ckpt_path=null``).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint (ckpt_path=null starts afresh)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    theirs = state.get("state_dict", {})
    mine = module.state_dict()
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    reshaped = [f"{k} {tuple(theirs[k].shape)} -> {tuple(mine[k].shape)}" for k in mine
                if k in theirs and hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(mine[k].shape)]
    diff = settings_diff(record, state.get(RUN_RECORD))
    if missing or unexpected or reshaped:
        few = lambda xs: ", ".join(xs[:3]) + (f" (+{len(xs) - 3} more)" if len(xs) > 3 else "")
        weights = "; ".join(f"{what}: {few(xs)}" for what, xs in
                            (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)) if xs)
        settings = ("; ".join(diff) if diff else
                    "the checkpoint was trained with other `heads` settings (heads=... or heads.<key>), "
                    "which it does not record")
        raise ValueError(
            f"cannot resume from {path}: its draft weights do not fit this run's heads. Settings that differ: "
            f"{settings}. Weights: {weights}. Rerun with the checkpoint's settings to resume it, or with "
            f"ckpt_path=null (or another hydra.run.dir) to start afresh."
        )
    if diff:
        log.warning("resuming from %s with other settings than it was trained with: %s", path, "; ".join(diff))
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs = progress.get("processed", state.get("epoch", 0))  # epochs trained through (the last may be partial)
    return {"global_step": int(state.get("global_step", 0)), "epochs": int(epochs)}


def nothing_trained_message(trainer: L.Trainer, path: str, start: dict) -> str:
    """Why a resume from ``path`` trained nothing: the limit it had already reached."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and start["global_step"] >= max_steps:
        limit = f"trainer.max_steps={max_steps}"
    else:
        limit = f"trainer.max_epochs={trainer.max_epochs}"
    return (f"nothing was trained: the checkpoint {path} had already reached {limit} ({start['epochs']} epoch(s), "
            f"{start['global_step']} step(s)); raise {limit.split('=')[0]} to train on from it, or set ckpt_path=null "
            f"to start afresh")


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
    record = RunRecord(heads_choice(), OmegaConf.to_container(cfg.heads, resolve=True))
    ckpt_path = resume_path(cfg, ckpt_dir)
    start = check_resume(ckpt_path, module, record.record) if ckpt_path else None
    callbacks = [checkpoint, checkpoint_callback(cfg, ckpt_dir), record]
    callbacks += [SeenKeysRecorder(out_dir / "seen_keys")] if cfg.record_keys else []
    trainer: L.Trainer = instantiate(cfg.trainer, "trainer", logger=instantiate_loggers(cfg.get("logger")),
                                     callbacks=callbacks, enable_checkpointing=True)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's is a SystemExit with code 0: a killed run must not look like a success
        log.error("SIGTERM at step %d: rerun with hydra.run.dir=%s to resume from %s", trainer.global_step, out_dir,
                  ckpt_dir / "last.ckpt")
        raise SystemExit(128 + signal.SIGTERM) from None
    trained = start is None or trainer.global_step != start["global_step"]
    if not trained:
        message = nothing_trained_message(trainer, ckpt_path, start)
        log.warning(message)
        if trainer.is_global_zero:
            print(message)
        if trainer.strategy.broadcast(not has_heads(out_dir / "heads")):  # ckpt_path=another run's: save its heads
            checkpoint.saved_step = None
        elif cfg.export_dir and not has_heads(cfg.export_dir) and trainer.is_global_zero:
            checkpoint.export()
    if checkpoint.saved_step != trainer.global_step and datamodule.val_manifest is not None:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # final metrics; saves the heads
    if checkpoint.saved_step != trainer.global_step:  # no validation data
        checkpoint.save(trainer, module)
    summary = {"heads_dir": str(out_dir / "heads"), "export_dir": cfg.export_dir, "best": checkpoint.best,
               "exported": checkpoint.exported, "global_step": trainer.global_step, "trained": trained}
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
