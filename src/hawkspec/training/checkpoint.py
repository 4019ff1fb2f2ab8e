"""The draft heads alone (``DraftHeads.save``), kept at their best by validation, and exported safely.

:class:`HeadsCheckpoint` keeps ``<run>/heads`` at the best heads of the run by ``monitor`` (``val/loss``, lower
is better; without validation data, the heads of the last save). ``val_metrics.json`` records them under
``best``: the monitor, its value, the epoch and the global step. ``export_dir`` gets a copy after every
improvement, through :func:`hawkspec.io.publish_dir` (atomic; a foreign folder is refused), unless it already
holds heads that scored better on the same monitor: those are kept unless ``overwrite=true``. The best score
is part of the callback's state, so it survives a resume from a Lightning checkpoint. A run folder whose heads
folder is empty always gets the heads of its first save, better or not (a run resumed from another run's checkpoint
must not end without heads of its own).

:class:`RunRecord` writes the settings that shape the drafter (``heads=`` and the ``heads`` group's keys) into
every Lightning checkpoint, so that a resume with other settings can say which one differs
(:func:`hawkspec.cli.train.check_resume`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from hawkspec.heads.draft import DraftHeads
from hawkspec.io import check_finite_state, copy_dir, is_ours, staged_dir

log = logging.getLogger(__name__)
VAL_METRICS = "val_metrics.json"
MONITOR = "val/loss"
HEADS_FILE = "heads.safetensors"
RUN_RECORD = "hawkspec"
"""The key of :class:`RunRecord`'s entry in a Lightning checkpoint."""


def has_heads(folder: str | Path | None) -> bool:
    """Whether ``folder`` holds saved heads (``heads.safetensors``)."""
    return folder is not None and (Path(folder) / HEADS_FILE).is_file()


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


def heads_report(heads: DraftHeads, trainer: L.Trainer, best: dict | None = None) -> dict:
    """The ``val_metrics.json`` of the heads as they are now (``best``: the monitor record, or None)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "best": best,
        "metrics": metrics,
        "heads": head_table(heads, metrics),
        "tokens_per_row": heads.tokens_per_row,
        "config": asdict(heads.config),
        "backbone": heads.identity,
    }


def save_heads(heads: DraftHeads, trainer: L.Trainer, folder: Path, best: dict | None = None) -> Path:
    """Write the heads (safetensors + heads.json) and ``val_metrics.json`` into ``folder``, atomically.

    Raises:
        hawkspec.io.NonFiniteError: when a weight is NaN or Inf (nothing is written then).
    """
    check_finite_state(heads.state_dict(), f"the draft heads of step {trainer.global_step}")
    with staged_dir(folder, "paths.output_dir", overwrite=True) as tmp:
        heads.save(tmp)
        (tmp / VAL_METRICS).write_text(json.dumps(heads_report(heads, trainer, best), indent=1))
    return Path(folder)


def recorded_best(folder: Path) -> dict | None:
    """The ``best`` record of the heads in ``folder`` (``{"monitor", "score", "epoch", "global_step"}``), if any."""
    path = Path(folder) / VAL_METRICS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("best")
    except (json.JSONDecodeError, AttributeError):
        return None


def is_better(mine: dict | None, theirs: dict | None) -> bool:
    """Whether heads with record ``mine`` may replace heads with record ``theirs`` (lower score is better).

    Only two scores of the same monitor are compared; without one of them the newer heads win.
    """
    if not mine or not theirs or mine.get("monitor") != theirs.get("monitor"):
        return True
    a, b = mine.get("score"), theirs.get("score")
    if a is None or b is None or not math.isfinite(b):
        return True
    return a <= b


class HeadsCheckpoint(Callback):
    """After every validation (not the sanity check), rank 0 keeps the best heads in ``dirpath`` and exports them.

    Args:
        dirpath: The run's heads folder (``${paths.output_dir}/heads``).
        export_dir: Also publish the best heads here (e.g. ``outputs/quickstart/heads/hawk``); None: don't.
        overwrite: Replace ``export_dir`` even when it is not ours or holds better heads.
        monitor: The validation metric that selects the heads (lower is better).
    """

    def __init__(self, dirpath: str | Path, export_dir: str | Path | None = None, overwrite: bool = False,
                 monitor: str = MONITOR):
        self.dirpath = Path(dirpath)
        self.export_dir = Path(export_dir) if export_dir else None
        self.overwrite, self.monitor = overwrite, monitor
        self.best: dict | None = None
        """``{"monitor", "score", "epoch", "global_step"}`` of the heads in ``dirpath``."""
        self.saved_step: int | None = None
        """Global step of the last save (set on every rank, so all ranks agree whether a final save is due)."""
        self.exported: bool | None = None
        """Whether the last save reached ``export_dir`` (False: it holds better heads; None: no export)."""

    # Lightning stores this in its checkpoints: a resumed run keeps comparing against the best so far.
    def state_dict(self) -> dict:
        return {"best": self.best, "saved_step": self.saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.saved_step = state_dict.get("best"), state_dict.get("saved_step")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save now if the heads are the best so far (rank 0 writes; every rank records the step)."""
        self.saved_step = trainer.global_step
        score = trainer.callback_metrics.get(self.monitor)
        record = {"monitor": self.monitor if score is not None else None,
                  "score": float(score) if score is not None else None,
                  "epoch": trainer.current_epoch, "global_step": trainer.global_step}
        if score is not None and self.best is not None and not is_better(record, self.best) \
                and has_heads(self.dirpath):
            log.info("heads of step %d: %s %.4f, not better than %.4f (epoch %s): kept the best", trainer.global_step,
                     self.monitor, record["score"], self.best["score"], self.best["epoch"])
            return
        self.best = record
        if not trainer.is_global_zero:
            return
        save_heads(pl_module.heads, trainer, self.dirpath, record)
        log.info("saved heads (step %d, %s=%s) to %s", trainer.global_step, self.monitor, record["score"], self.dirpath)
        self.export()

    def export(self) -> None:
        """Publish ``dirpath`` at ``export_dir``, unless that holds better heads (and not ``overwrite``)."""
        if self.export_dir is None:
            return
        theirs = recorded_best(self.export_dir) if is_ours(self.export_dir) else None
        if not self.overwrite and not is_better(self.best, theirs):
            log.warning("export_dir=%s holds better heads (%s %.4f, epoch %s) than this run's (%.4f): kept them; "
                        "add overwrite=true to replace them", self.export_dir, theirs["monitor"], theirs["score"],
                        theirs.get("epoch"), self.best["score"])
            self.exported = False
            return
        copy_dir(self.dirpath, self.export_dir, "export_dir", self.overwrite)
        self.exported = True


class RunRecord(Callback):
    """Adds ``{"heads": <the heads= choice or None>, "heads_config": <the heads group, resolved>}`` to every
    Lightning checkpoint under :data:`RUN_RECORD`: what a resume compares its own settings with."""

    def __init__(self, heads: str | None, heads_config: dict):
        self.record = {"heads": heads, "heads_config": heads_config}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_RECORD] = self.record
