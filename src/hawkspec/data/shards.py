"""Streaming the hidden-state cache into head training: a WebDataset LightningDataModule.

Training streams (``resampled=True``, the default)::

    WebDataset(urls, resampled=True, nodesplitter=split_by_node, workersplitter=split_by_worker)
      -> shuffle (buffer, seeded by seed/epoch/rank/worker) -> decode + check -> batched -> with_epoch

Every rank draws shards with replacement, forever; ``with_epoch`` cuts an epoch at
``samples_per_epoch / world_size / batch_size`` batches per rank (split over the DataLoader workers), so every
rank runs the same number of steps. With ``resampled=False`` every rank reads a disjoint set of shards
(``split_by_node``, then ``split_by_worker``) exactly once per epoch: across the world one epoch sees every
sample exactly once. That needs the same number of batches on every rank, which is checked up front.
Validation always streams once through its shards without resampling.

Both manifests are read and checked against the backbone first (:func:`hawkspec.data.manifest.check_compatible`);
a shard whose size differs from the manifest, or that fails to parse, is reported by file name. Every time a
worker opens a shard, :class:`ChecksummedOpen` hashes it and compares the SHA-256 with the one its manifest
recorded at write time, *before* the first sample of it enters the pipeline (so a same-size, finite-valued
corruption never reaches a training step). An exact pass also counts every shard's samples against the manifest
(:class:`ShardCounter`), and a NaN / Inf in a sample is refused naming the sample and the shard.

Why hash at open rather than over the bytes the tar reader consumes: the digest of a streamed read is only
complete at the end of the shard, after its samples went downstream (into the shuffle buffer and possibly a
step); and a resampled epoch (``with_epoch``) abandons the shard it is reading at every epoch boundary, so its
tail is never read, the digest never completes, and an error raised while Python closes the abandoned generator
is swallowed. Hashing the opened file first (the same file handle the tar reader then reads from offset 0)
checks every shard that is ever used, whatever the node / worker split or resampling, at the cost of one extra
sequential read that the page cache usually serves. A worker remembers the shards it verified by
``(device, inode, size, mtime, ctime)``, so resampling does not hash a shard again unless the file changed.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing as mp
import os
import random
import re
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds

from hawkspec.data.manifest import MANIFEST, ShardManifest, check_compatible, stream_digest

log = logging.getLogger(__name__)


class CorruptShardError(RuntimeError):
    """A shard that cannot be read; the message names the file."""


def raise_naming_shard(exn: Exception) -> bool:
    """WebDataset error handler: re-raise any read error as :class:`CorruptShardError` naming the shard file."""
    text = " ".join(str(a) for a in exn.args)
    found = re.findall(r"[^\s'\"<>=]+\.tar\b", text)
    where = found[-1] if found else "an unknown shard"
    detail = exn.args[0] if exn.args else exn
    raise CorruptShardError(f"cannot read shard {where}: {type(exn).__name__}: {detail}") from exn


def repair_hint(folder: Path) -> str:
    """How to repair or check the cache that ``folder`` (a split) belongs to."""
    return (f"rerun the `hawkspec-cache` command that wrote this cache (same settings: it rewrites exactly the damaged "
            f"shards), or list every damaged shard with `hawkspec-cache mode=verify cache.out_dir={folder.parent}`")


class ChecksummedOpen:
    """Pipeline stage ``{"url"}`` -> ``{"url", "stream", "local_path"}`` (WebDataset's opener of local shards)
    that first checks the shard's SHA-256 against the manifest (see the module docstring).

    Raises :class:`CorruptShardError` naming the shard, the manifest and the shard's record when they differ; a
    shard whose manifest entry records no checksum (a cache from an older hawkspec) is read unchecked
    (:meth:`ShardDataModule._read` warns about it).

    Args:
        folder: The split folder (``manifest.json`` and the shards).
        manifest: Its manifest.
    """

    def __init__(self, folder: Path, manifest: ShardManifest):
        self.folder = Path(folder)
        self.expected = {Path(s["name"]).name: s.get("sha256") for s in manifest.shards}
        self.verified: dict[str, tuple] = {}  # path -> stat stamp of the file as it was verified (per process)

    def check(self, url: str, stream) -> None:
        """Hash ``stream`` (the opened shard) and rewind it; raise when the digest differs from the manifest's."""
        st = os.fstat(stream.fileno())
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        want = self.expected.get(Path(url).name)
        if want is None or self.verified.get(url) == stamp:
            return
        size, got = stream_digest(stream)
        stream.seek(0)
        if got != want:
            record = Path(url).with_name(Path(url).name + ".json")
            sidecar = f" and its record {record}" if record.is_file() else ""
            raise CorruptShardError(
                f"shard {url} is corrupted: its SHA-256 is {got}, but {self.folder / MANIFEST}{sidecar} recorded "
                f"{want} when it was written ({size} bytes read); none of its samples was used. To repair: "
                + repair_hint(self.folder)
            )
        self.verified[url] = stamp

    def __call__(self, src):
        for item in src:
            url = item["url"] if isinstance(item, dict) else item
            try:
                stream = open(url, "rb")
            except OSError as e:
                raise CorruptShardError(f"cannot open shard {url} listed in {self.folder / MANIFEST}: {e}; "
                                        + repair_hint(self.folder)) from e
            try:
                self.check(url, stream)
                yield dict(url=url, stream=stream, local_path=url)
            finally:  # the tar reader is done with it once the next shard is asked for (or the pipeline closes)
                stream.close()


class ShardStream(wds.DataPipeline, wds.FluidInterface):
    """``wds.WebDataset(urls, resampled, nodesplitter, workersplitter=split_by_worker)`` with a checksummed opener:
    shard list (resampled with replacement, or each once) -> split by node (optional) -> split by worker ->
    :class:`ChecksummedOpen` -> tar members -> samples grouped by key. Read errors go to ``handler``."""

    def __init__(self, urls: list[str], opener: ChecksummedOpen, resampled: bool, split_nodes: bool, handler):
        super().__init__()
        self.append(wds.ResampledShards(urls) if resampled else wds.SimpleShardList(urls))
        if split_nodes:
            self.append(wds.split_by_node)
        self.append(wds.split_by_worker)
        self.append(opener)
        self.append(wds.pipelinefilter(wds.tariterators.tar_file_expander)(handler=handler))
        self.append(wds.pipelinefilter(wds.tariterators.group_by_keys)(handler=handler))


class SharedEpoch:
    """The current epoch, shared with DataLoader worker processes (set from the training loop)."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


class EpochShuffle:
    """Buffered sample shuffle whose seed mixes the epoch, rank and worker (a new order every epoch).

    Args:
        bufsize: Samples held in the buffer.
        seed: Base seed.
        epoch: The shared epoch counter.
    """

    def __init__(self, bufsize: int, seed: int, epoch: SharedEpoch):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def rng(self) -> random.Random:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        state = np.random.SeedSequence([self.seed, self.epoch.get(), rank, worker]).generate_state(2)
        return random.Random(int(state[0]) << 32 | int(state[1]))

    def __call__(self, src):
        rng, buf = self.rng(), []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            j = rng.randrange(len(buf))
            buf[j], sample = sample, buf[j]
            yield sample
        rng.shuffle(buf)
        yield from buf


class SampleDecoder:
    """Raw tar members -> tensors, with the shapes the manifest promises.

    Output per sample: ``__key__`` (str), ``hidden`` (S, d) float16, ``codes`` (S - 1,) int16 and, when
    ``topk`` is set, ``topk_probs`` (S, topk) float16 and ``topk_idx`` (S, topk) int16.
    """

    def __init__(self, manifest: ShardManifest, topk: bool):
        self.seq = manifest.sequence_length
        self.hidden_size = manifest.hidden_size
        self.topk = manifest.topk if topk else 0

    @staticmethod
    def _load(sample: dict, field: str) -> np.ndarray:
        if field not in sample:
            raise CorruptShardError(f"sample {sample['__key__']} in shard {sample.get('__url__')} has no {field}")
        try:
            return np.load(io.BytesIO(sample[field]), allow_pickle=False)
        except Exception as e:
            raise CorruptShardError(f"cannot decode {field} of sample {sample['__key__']} in shard "
                                    f"{sample.get('__url__')}: {e}") from e

    def __call__(self, sample: dict) -> dict:
        out = {"__key__": sample["__key__"]}
        want = {"hidden": ((self.seq, self.hidden_size), np.float16), "codes": ((self.seq - 1,), np.int16)}
        if self.topk:
            want |= {"topk_probs": ((self.seq, self.topk), np.float16), "topk_idx": ((self.seq, self.topk), np.int16)}
        for name, (shape, dtype) in want.items():
            arr = self._load(sample, f"{name}.npy")
            if arr.shape != shape or arr.dtype != dtype:
                raise CorruptShardError(
                    f"{name}.npy of sample {sample['__key__']} in shard {sample.get('__url__')} is "
                    f"{arr.dtype}{arr.shape}; the manifest promises {np.dtype(dtype)}{shape}"
                )
            if arr.dtype == np.float16 and not np.isfinite(arr).all():
                raise CorruptShardError(
                    f"{name}.npy of sample {sample['__key__']} in shard {sample.get('__url__')} holds NaN or Inf: "
                    "the shard is damaged (`hawkspec-cache mode=verify cache.out_dir=...` checks the cache)"
                )
            out[name] = torch.from_numpy(arr)
        out["__url__"] = sample.get("__url__")
        return out


class ShardCounter:
    """Pipeline stage of an exact pass: every shard must yield exactly the samples the manifest lists.

    Samples arrive grouped by shard (before any shuffle); when a shard ends, its count is compared with the
    manifest's, so a manifest that understates (or overstates) a shard fails instead of skipping samples.
    """

    def __init__(self, manifest: ShardManifest):
        self.expected = {Path(s["name"]).name: int(s["count"]) for s in manifest.shards}

    def _check(self, url: str | None, seen: int) -> None:
        if url is None:
            return
        want = self.expected.get(Path(url).name)
        if want != seen:
            raise CorruptShardError(f"shard {url} holds {seen} samples but its manifest says {want}: the cache is "
                                    "damaged or its manifest.json was edited; run `hawkspec-cache` again to repair it")

    def __call__(self, src):
        url, seen = None, 0
        for sample in src:
            if sample.get("__url__") != url:
                self._check(url, seen)
                url, seen = sample.get("__url__"), 0
            seen += 1
            yield sample
        self._check(url, seen)


def collate(samples: list[dict]) -> dict:
    """Stack decoded samples: hidden (B, S, d) fp16, codes (B, S-1) int16, topk (B, S, k), keys and shards lists."""
    out = {"keys": [s["__key__"] for s in samples], "shards": sorted({str(s.get("__url__")) for s in samples})}
    for name in samples[0]:
        if not name.startswith("__"):
            out[name] = torch.stack([s[name] for s in samples])
    return out


def worker_batches(counts: list[int], rank: int, world: int, workers: int, batch_size: int) -> int:
    """Batches rank ``rank`` yields in one non-resampled pass: shards ``rank::world``, then ``worker::workers``,
    each worker batching its own samples (last batch partial)."""
    mine = counts[rank::world]
    return sum(math.ceil(sum(mine[w::workers]) / batch_size) for w in range(workers))


class ShardDataModule(L.LightningDataModule):
    """Hidden-state shards from ``hawkspec-cache`` as training and validation batches.

    Args:
        train_dir: A cache split folder with ``manifest.json`` (``<cache.out_dir>/train``).
        val_dir: The validation split folder; None for no validation.
        batch_size: Samples per batch (per rank).
        resampled: True: sample shards with replacement, ``samples_per_epoch`` per epoch. False: one exact pass.
        samples_per_epoch: Samples per epoch over the whole world in resampled mode; None: the train split size.
        shuffle_buffer: Samples in the shuffle buffer (0: no shuffling).
        num_workers: DataLoader worker processes.
        seed: Shuffle seed (mixed with the epoch, rank and worker).
        identity: The backbone's identity; the manifests must match it.
        topk: Also load the cached top-k targets (distillation); the cache must have them.
        pin_memory: Pin batches (GPU training).
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        batch_size: int = 32,
        resampled: bool = True,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        num_workers: int = 1,
        seed: int = 0,
        identity: dict | None = None,
        topk: bool = False,
        pin_memory: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be >= 1 or null, got {samples_per_epoch}")
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir) if val_dir else None
        self.batch_size, self.resampled, self.samples_per_epoch = batch_size, resampled, samples_per_epoch
        self.shuffle_buffer, self.num_workers, self.seed = shuffle_buffer, num_workers, seed
        self.identity, self.topk, self.pin_memory = identity, topk, pin_memory
        self.epoch = SharedEpoch()
        self.train_manifest = self._read(self.train_dir, "data.train_dir")
        if self.val_dir is not None and not self.val_dir.exists() and self.val_dir.parent == self.train_dir.parent:
            log.warning("data.val_dir=%s does not exist (a cache made with cache.val_samples=0): training without "
                        "validation; the heads of the last step are saved", self.val_dir)
            self.val_dir = None
        self.val_manifest = self._read(self.val_dir, "data.val_dir") if self.val_dir else None

    # ----------------------------------------------------------------------------------------- manifests
    def _read(self, folder: Path, key: str) -> ShardManifest:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{key}={folder} does not exist: run `hawkspec-cache` first and point at its output"
            )
        manifest = ShardManifest.read(folder)
        if self.identity is not None:
            check_compatible(manifest, self.identity, folder)
        if self.topk and not manifest.topk:
            raise ValueError(f"distillation needs cached top-k targets but {folder} has topk=0: rerun "
                             "`hawkspec-cache cache.topk=K` or set `loss.distill_weight=0`")
        for s in manifest.shards:  # a truncated or replaced shard is caught here, by name
            size = (folder / s["name"]).stat().st_size
            if "bytes" in s and size != s["bytes"]:
                raise CorruptShardError(f"shard {folder / s['name']} has {size} bytes, {folder / MANIFEST} says "
                                        f"{s['bytes']}: it is truncated or was overwritten; " + repair_hint(folder))
        unchecked = [s["name"] for s in manifest.shards if not s.get("sha256")]
        if unchecked:
            log.warning("%s records no SHA-256 for %d shard(s) (%s...; a cache from an older hawkspec): they are read "
                        "without a checksum; rerun `hawkspec-cache` into a new cache.out_dir to get one",
                        folder / MANIFEST, len(unchecked), unchecked[0])
        return manifest

    def set_epoch(self, epoch: int) -> None:
        """Called at every training epoch start: reseeds the shuffle of all workers."""
        self.epoch.set(epoch)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # ----------------------------------------------------------------------------------------- pipelines
    def _pipeline(self, manifest: ShardManifest, folder: Path, resampled: bool, shuffle: bool,
                  split_nodes: bool) -> ShardStream:
        ds = ShardStream(manifest.urls(folder), ChecksummedOpen(folder, manifest), resampled=resampled,
                         split_nodes=split_nodes, handler=raise_naming_shard)
        if not resampled:
            ds = ds.compose(ShardCounter(manifest))
        if shuffle and self.shuffle_buffer > 0:
            ds = ds.compose(EpochShuffle(self.shuffle_buffer, self.seed, self.epoch))
        decoder = SampleDecoder(manifest, self.topk)
        return ds.map(decoder).batched(self.batch_size, collation_fn=collate, partial=True)

    def _loader(self, ds, workers: int, num_batches: int) -> wds.WebLoader:
        loader = wds.WebLoader(
            ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=self.pin_memory,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        )
        with warnings.catch_warnings():  # "with_length only sets __len__": exactly what it is for here
            warnings.simplefilter("ignore", UserWarning)
            return loader.with_length(num_batches)

    def train_dataloader(self) -> wds.WebLoader:
        m, (rank, world) = self.train_manifest, self._world()
        if self.resampled:
            per_rank = (self.samples_per_epoch or m.num_samples) // world
            num_batches = max(1, per_rank // self.batch_size)
            workers = min(self.num_workers, num_batches)
            per_worker = math.ceil(num_batches / max(1, workers))
            ds = self._pipeline(m, self.train_dir, resampled=True, shuffle=True, split_nodes=True)
            ds = ds.with_epoch(per_worker)
            return self._loader(ds, workers, per_worker * max(1, workers))
        if len(m.shards) < world:
            raise ValueError(f"data.resampled=false gives every rank its own shards, but {self.train_dir} has "
                             f"{len(m.shards)} shards for {world} ranks: cache more shards (smaller cache.shard_size)")
        workers = max(1, min(self.num_workers, len(m.shards) // world)) if self.num_workers else 0
        batches = [worker_batches(m.counts(), r, world, max(1, workers), self.batch_size) for r in range(world)]
        if len(set(batches)) > 1:
            raise ValueError(
                f"data.resampled=false needs the same number of batches on every rank (DDP steps in lockstep), but "
                f"the shards of {self.train_dir} give ranks {batches} batches: choose cache.num_samples/shard_size so "
                "every rank gets equally many samples, or set data.resampled=true"
            )
        ds = self._pipeline(m, self.train_dir, resampled=False, shuffle=True, split_nodes=True)
        return self._loader(ds, workers, batches[rank])

    def val_dataloader(self) -> wds.WebLoader | list:
        if self.val_manifest is None:
            return []
        m, (rank, world) = self.val_manifest, self._world()
        split = len(m.shards) >= world  # fewer shards than ranks: every rank reads all (the metrics stay exact)
        world_eff = world if split else 1
        workers = max(1, min(self.num_workers, len(m.shards) // world_eff)) if self.num_workers else 0
        nb = worker_batches(m.counts(), rank if split else 0, world_eff, max(1, workers), self.batch_size)
        ds = self._pipeline(m, self.val_dir, resampled=False, shuffle=False, split_nodes=split)
        return self._loader(ds, workers, nb)
