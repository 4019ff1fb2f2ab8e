"""Cache one split end to end: pin the plan, predict the missing shards on every rank, write the manifest."""

from __future__ import annotations

import logging
import time
import warnings

import lightning as L

from hawkspec.cache.plan import CachePlan
from hawkspec.cache.predict import CacheModule
from hawkspec.cache.writer import ShardTarWriter

log = logging.getLogger(__name__)


def cache_split(trainer: L.Trainer, module: CacheModule, plan: CachePlan) -> dict:
    """Write every missing shard of ``plan`` and then (rank 0) its manifest.

    ``trainer`` must carry a :class:`~hawkspec.cache.writer.ShardTarWriter` callback. Safe to rerun: finished
    shards are skipped, so an interrupted run resumes where it stopped.

    Returns:
        Counts and timing of this run: ``samples_written`` (world-wide), ``seconds``, ``samples_per_s``.
    """
    if not any(isinstance(c, ShardTarWriter) for c in trainer.callbacks):
        raise ValueError("the cache trainer needs a ShardTarWriter callback (hawkspec.cache.writer)")
    plan.validate().claim()
    todo = plan.pending()  # world-wide, before anyone writes: what this run computes
    samples = sum(b - a for a, b in map(plan.shard_range, todo))
    module.plan = plan
    start = time.perf_counter()
    if todo:
        with warnings.catch_warnings():  # a sized IterableDataset of shard ids, no batch indices: both intended
            warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
            warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
            trainer.predict(module, return_predictions=False)
    trainer.strategy.barrier("cache_split")
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        path = plan.manifest().write(plan.out_dir)
        log.info("%s: %d samples in %d shards -> %s", plan.split, plan.num_samples, plan.num_shards, path)
    trainer.strategy.barrier("cache_manifest")
    return {
        "split": plan.split,
        "num_samples": plan.num_samples,
        "num_shards": plan.num_shards,
        "samples_written": samples,
        "shards_written": len(todo),
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2) if samples and seconds > 0 else None,
    }
