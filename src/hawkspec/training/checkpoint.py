"""Checkpoints of the draft heads alone (``DraftHeads.save``) with their validation metrics."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from hawkspec.heads.draft import DraftHeads

log = logging.getLogger(__name__)
VAL_METRICS = "val_metrics.json"


def head_table(heads: DraftHeads, metrics: dict[str, float]) -> list[dict]:
    """One row per head: name, kind, index, offset (tokens), displacement (rows, cols) and top-1/top-5."""
    W = heads.tokens_per_row
    rows = []
    for name, offset in zip(heads.names, heads.offsets):
        drow, dcol = divmod(offset, W)
        rows.append({
            "name": name, "kind": "horizontal" if name[0] == "h" else "vertical", "index": int(name[1:]),
            "offset": offset, "rows": drow, "cols": dcol,
            "top1": metrics.get(f"val/head_{name}_top1"), "top5": metrics.get(f"val/head_{name}_top5"),
        })
    return rows


def save_heads(heads: DraftHeads, trainer: L.Trainer, folder: Path) -> Path:
    """Write the heads (safetensors + heads.json) and ``val_metrics.json`` into ``folder``."""
    heads.save(folder)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    report = {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "metrics": metrics,
        "heads": head_table(heads, metrics),
        "tokens_per_row": heads.tokens_per_row,
        "config": asdict(heads.config),
        "backbone": heads.identity,
    }
    (folder / VAL_METRICS).write_text(json.dumps(report, indent=1))
    return folder


class HeadsCheckpoint(Callback):
    """After every validation (not the sanity check), rank 0 saves the heads and their metrics to ``dirpath``.

    Args:
        dirpath: The run's heads folder (``${paths.output_dir}/heads``).
        export_dir: Also copy the folder here (e.g. ``outputs/quickstart/heads/hawk``); None: don't.
    """

    def __init__(self, dirpath: str | Path, export_dir: str | Path | None = None):
        self.dirpath = Path(dirpath)
        self.export_dir = Path(export_dir) if export_dir else None
        self.saved_step: int | None = None
        """Global step of the last save (set on every rank, so all ranks agree whether a final save is due)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save now (rank 0 writes; every rank records the step)."""
        self.saved_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        save_heads(pl_module.heads, trainer, self.dirpath)
        if self.export_dir is not None:
            if self.export_dir.exists():
                shutil.rmtree(self.export_dir)
            shutil.copytree(self.dirpath, self.export_dir)
        log.info("saved heads (step %d) to %s", trainer.global_step, self.dirpath)
