"""Writing shards: a tar per shard, written under a temporary name, recorded (size, SHA-256, count) and renamed
atomically when complete. Non-finite values are refused before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter

from hawkspec.cache.plan import CachePlan, file_digest
from hawkspec.cache.predict import ShardData
from hawkspec.io import NonFiniteError, atomic_write_json

#: Fixed tar member mtime: the same shard contents give the same bytes (reproducible, comparable shards).
TAR_MTIME = 0.0


def write_shard(plan: CachePlan, shard: ShardData) -> Path:
    """Write ``shard`` to ``plan.path(shard.index)`` via ``.tmp`` + fsync + rename; returns the final path.

    A crash at any point leaves either no file or a ``.tmp`` file that no reader lists and the next run
    overwrites; the final name appears only for a complete shard.
    """
    check_finite_shard(shard)
    final, tmp = plan.path(shard.index), plan.tmp_path(shard.index)
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=TAR_MTIME)
        for sample in shard.samples():
            writer.write(sample)
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    size, sha256 = file_digest(tmp)
    atomic_write_json(plan.record_path(shard.index), {"bytes": size, "sha256": sha256, "count": len(shard.keys)})
    os.replace(tmp, final)
    return final


def check_finite_shard(shard: ShardData) -> None:
    """Raise :class:`~hawkspec.io.NonFiniteError` naming the samples whose hidden states or top-k hold NaN / Inf."""
    for name, arr in (("hidden", shard.hidden), ("topk_probs", shard.topk_probs)):
        if arr is None:
            continue
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        if bad.any():
            keys = [k for k, b in zip(shard.keys, bad) if b]
            raise NonFiniteError(f"{name} of sample(s) {keys[:5]} of shard {shard.index} hold NaN or Inf; "
                                 "nothing was written: check the backbone (`backbone.*`) and `sampling.*`")


class ShardTarWriter(BasePredictionWriter):
    """Writes every predicted :class:`ShardData` of :class:`~hawkspec.cache.predict.CacheModule` to its plan."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.written: list[Path] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.written.append(write_shard(pl_module.plan, prediction))
