"""Record which cached samples each rank trained on (to check that an exact epoch sees every sample once)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class SeenKeysRecorder(Callback):
    """Appends the ``keys`` of every training batch; writes ``<dirpath>/rank<r>.txt`` (one key a line) at fit end.

    Args:
        dirpath: Output folder (``${paths.output_dir}/seen_keys``).
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.keys: list[str] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch: dict, batch_idx: int) -> None:
        self.keys.extend(batch["keys"])

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.txt").write_text("".join(k + "\n" for k in self.keys))
