"""Writing shards: a tar per shard, written under a temporary name and renamed atomically when complete."""

from __future__ import annotations

import os
from pathlib import Path

import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter

from hawkspec.cache.plan import CachePlan
from hawkspec.cache.predict import ShardData

#: Fixed tar member mtime: the same shard contents give the same bytes (reproducible, comparable shards).
TAR_MTIME = 0.0


def write_shard(plan: CachePlan, shard: ShardData) -> Path:
    """Write ``shard`` to ``plan.path(shard.index)`` via ``.tmp`` + fsync + rename; returns the final path.

    A crash at any point leaves either no file or a ``.tmp`` file that no reader lists and the next run
    overwrites; the final name appears only for a complete shard.
    """
    final, tmp = plan.path(shard.index), plan.tmp_path(shard.index)
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=TAR_MTIME)
        for sample in shard.samples():
            writer.write(sample)
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


class ShardTarWriter(BasePredictionWriter):
    """Writes every predicted :class:`ShardData` of :class:`~hawkspec.cache.predict.CacheModule` to its plan."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.written: list[Path] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.written.append(write_shard(pl_module.plan, prediction))
