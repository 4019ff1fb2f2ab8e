"""Benchmark the two phases of head training on the shipped tiny model: cache writing and head training.

Prints cache-writing throughput (samples/s, self-distillation with AR sampling + teacher forcing) and head-training
throughput (samples/s) with the fraction of step time spent waiting on data, measured two ways:

* ``timing``: a callback timing the gap between the end of one training batch and the start of the next (the
  DataLoader fetch plus Lightning's bookkeeping) against the whole step period;
* ``profiler``: Lightning's SimpleProfiler, ``train_dataloader_next`` over
  ``train_dataloader_next + run_training_batch``.

The first ``--warmup`` steps (worker start-up, first allocations) are excluded.

    python experiments/bench_train.py                                   # fresh 1024-sample cache, 300 steps
    python experiments/bench_train.py --shards outputs/quickstart/cache/shards --steps 500 --workers 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.cache.plan import CachePlan
from hawkspec.cache.predict import CacheModule
from hawkspec.cache.runner import cache_split
from hawkspec.cache.writer import ShardTarWriter
from hawkspec.data.shards import ShardDataModule
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.training.heads import HeadTrainingModule


class StepTimer(Callback):
    """Wall-clock time waiting for each batch vs. the whole step period, after ``warmup`` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.wait, self.period, self.samples = warmup, 0.0, 0.0, 0
        self._end = self._start = None
        self._step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._end is not None and self._step >= self.warmup:
            self.wait += now - self._end
            self.period += now - self._end
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._step >= self.warmup:
            self.period += now - self._start
            self.samples += len(batch["keys"])
        self._end, self._step = now, self._step + 1


def write_cache(backbone: TinyBackbone, out: Path, samples: int, batch_size: int, sampling: SamplingConfig) -> float:
    """Cache ``samples`` train and 64 val samples; returns the train cache's samples/s."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[ShardTarWriter()])
    module = CacheModule(backbone, sampling)
    sd = {"temperature": sampling.temperature, "top_k": sampling.top_k, "cfg_scale": sampling.cfg_scale}
    rates = []
    for split, n, seed in (("train", samples, 0), ("val", 64, 1)):
        plan = CachePlan(out / split, split, n, 256, batch_size, seed, "self", 0, sd, backbone.identity())
        rates.append(cache_split(trainer, module, plan)["samples_per_s"])
    return rates[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", help="an existing cache (cache.out_dir); default: write a fresh one and time it")
    ap.add_argument("--cache-samples", type=int, default=1024)
    ap.add_argument("--cache-batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--backbone", default=None, help="tiny backbone folder (default: the shipped weights)")
    args = ap.parse_args()

    backbone = TinyBackbone.from_pretrained(args.backbone).eval()
    result = {"device": "cpu", "threads": torch.get_num_threads()}
    tmp = None
    shards = Path(args.shards) if args.shards else None
    if shards is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_cache_")
        shards = Path(tmp.name)
        result["cache_samples_per_s"] = write_cache(
            backbone, shards, args.cache_samples, args.cache_batch_size, SamplingConfig()
        )
        result["cache_samples"] = args.cache_samples

    dm = ShardDataModule(str(shards / "train"), None, batch_size=args.batch_size, num_workers=args.workers,
                         identity=backbone.identity(), resampled=True,
                         samples_per_epoch=(args.steps + 1) * args.batch_size)
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=4, vertical=True, vsd=2), backbone)
    module = HeadTrainingModule(heads, backbone.grid, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    report_dir = tempfile.TemporaryDirectory(prefix="bench_profile_")
    timer, profiler = StepTimer(args.warmup), SimpleProfiler(dirpath=report_dir.name, filename="simple")  # no stdout
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], profiler=profiler)
    trainer.fit(module, datamodule=dm)

    fetch = profiler.recorded_durations["[_TrainingEpochLoop].train_dataloader_next"][args.warmup :]
    step = profiler.recorded_durations["run_training_batch"][args.warmup :]
    result.update({
        "train_steps_measured": args.steps - args.warmup,
        "train_batch_size": args.batch_size,
        "train_workers": args.workers,
        "train_samples_per_s": round(timer.samples / timer.period, 1),
        "data_wait_fraction_timing": round(timer.wait / timer.period, 4),
        "data_wait_fraction_profiler": round(sum(fetch) / (sum(fetch) + sum(step)), 4),
    })
    print(json.dumps(result, indent=1))
    report_dir.cleanup()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
