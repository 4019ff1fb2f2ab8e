"""Hydra callbacks of the entry points."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("hawkspec")


class SweepTable(Callback):
    """After a ``hawkspec-eval`` multirun: one table over all its jobs in ``<sweep dir>/sweep_results.{md,json}``
    (:func:`hawkspec.metrics.sweep.write_sweep_table`). Runs in the launching process, whatever the launcher."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hawkspec.metrics.sweep import write_sweep_table

        out = write_sweep_table(config.hydra.sweep.dir)
        if out is None:
            log.warning("sweep table: no job under %s wrote a results.json", config.hydra.sweep.dir)
        else:
            log.info("Sweep table over all jobs: %s", out)
            print(f"sweep table: {out}")
