"""Cache one split end to end: pin the plan, repair, predict the missing shards on every rank, write the manifest;
and :func:`verify_split`, the on-demand check of a finished split (``hawkspec-cache mode=verify``)."""

from __future__ import annotations

import logging
import tarfile
import time
import warnings
from pathlib import Path

import lightning as L

from hawkspec.cache.plan import CachePlan, check_file
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
    if trainer.is_global_zero:  # before the other ranks start (DDP launches them inside predict) or after a barrier
        for i, problem in plan.repair().items():
            log.warning("%s: shard %s is damaged (%s): deleted, it is written again", plan.split, plan.path(i), problem)
    trainer.strategy.barrier("cache_repair")
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


def count_samples(path: Path) -> int:
    """Samples in a WebDataset tar: distinct keys (member names up to their first dot)."""
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar if m.isfile()})


def verify_split(folder: str | Path) -> dict:
    """Check a finished split against its manifest: every shard's size, SHA-256 and sample count.

    Returns:
        ``{"folder", "num_samples", "num_shards", "damaged": {shard name: problem}}``; empty ``damaged`` = intact.
    """
    from hawkspec.data.manifest import ShardManifest

    folder = Path(folder)
    manifest = ShardManifest.read(folder, require_shards=False)
    damaged = {}
    for s in manifest.shards:
        path = folder / s["name"]
        problem = check_file(path, s)
        if problem is None:
            try:
                n = count_samples(path)
            except (tarfile.TarError, OSError) as e:
                problem = f"it is not a readable tar ({e})"
            else:
                if n != int(s["count"]):
                    problem = f"it holds {n} samples, the manifest says {s['count']}"
        if problem is None and "sha256" not in s:
            problem = "the manifest records no checksum (a cache from an older hawkspec): rerun `hawkspec-cache`"
        if problem:
            damaged[s["name"]] = problem
    return {"folder": str(folder), "num_samples": manifest.num_samples, "num_shards": len(manifest.shards),
            "damaged": damaged}
