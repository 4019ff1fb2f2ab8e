"""``hawkspec-cache``: run the frozen backbone teacher-forced and write hidden-state shards (train/ and val/).

``mode=verify`` checks a finished cache instead (every shard's size, SHA-256 and sample count against its
manifest) and exits with an error naming the damaged shards; rerunning the writing command rewrites just those.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.cache.plan import CachePlan
from hawkspec.cache.predict import CacheModule
from hawkspec.cache.runner import cache_split, verify_split
from hawkspec.cache.writer import ShardTarWriter
from hawkspec.cli.common import CONF_PATH, instantiate, task
from hawkspec.cli.validate import validate_cache
from hawkspec.data.manifest import MANIFEST
from hawkspec.data.shards import CorruptShardError
from hawkspec.io import atomic_write_json
from hawkspec.decoding.sampling import SamplingConfig

log = logging.getLogger("hawkspec")


def make_plans(cfg: DictConfig, backbone: Backbone) -> list[CachePlan]:
    """The train split (``seed``) and, when ``cache.val_samples > 0``, the val split (``seed + 1``)."""
    c = cfg.cache
    if c.val_samples < 0:
        raise ValueError(f"cache.val_samples must be >= 0 (0 skips the val split), got {c.val_samples}")
    common = dict(
        shard_size=int(c.shard_size), batch_size=int(c.batch_size), source=str(c.source), topk=int(c.topk),
        sampling=OmegaConf.to_container(cfg.sampling, resolve=True), identity=backbone.identity(),
    )
    if c.source == "images":  # real image-caption pairs: the folder (and its order) is part of the plan
        from hawkspec.data.image_text import check_splits

        common["images"] = {k: v for k, v in OmegaConf.to_container(c.images, resolve=True).items()}
        check_splits(common["images"], int(c.num_samples), int(c.val_samples))
    splits = [("train", int(c.num_samples), int(cfg.seed))]
    if c.val_samples:
        splits.append(("val", int(c.val_samples), int(cfg.seed) + 1))
    out = Path(c.out_dir)
    return [
        CachePlan(out_dir=out / name, split=name, num_samples=n, seed=s, **common).validate() for name, n, s in splits
    ]


def verify(out_dir: Path) -> dict:
    """``mode=verify``: check every split under ``out_dir``; raise naming the damaged shards."""
    splits = [p for p in sorted(out_dir.iterdir()) if (p / MANIFEST).is_file()] if out_dir.is_dir() else []
    if not splits:
        raise FileNotFoundError(f"cache.out_dir={out_dir} holds no finished split (no */{MANIFEST}): point it at the "
                                "output of `hawkspec-cache`")
    reports = [verify_split(p) for p in splits]
    for r in reports:
        state = "ok" if not r["damaged"] else f"{len(r['damaged'])} damaged"
        print(f"verify {r['folder']}: {r['num_shards']} shards, {r['num_samples']} samples: {state}")
    bad = {f"{r['folder']}/{name}": why for r in reports for name, why in r["damaged"].items()}
    if bad:
        lines = "\n".join(f"  {k}: {v}" for k, v in bad.items())
        raise CorruptShardError(f"{len(bad)} damaged shard(s) in cache.out_dir={out_dir}:\n{lines}\n"
                                "Rerun the `hawkspec-cache` command that wrote it (same settings): it rewrites only these")
    return {"out_dir": str(out_dir), "splits": reports}


@task
def run(cfg: DictConfig) -> dict:
    validate_cache(cfg)
    if cfg.get("mode", "write") == "verify":
        return verify(Path(cfg.cache.out_dir))
    L.seed_everything(cfg.seed, workers=True)
    backbone: Backbone = instantiate(cfg.backbone, "backbone").eval()
    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    plans = make_plans(cfg, backbone)
    module = CacheModule(backbone, sampling)
    trainer: L.Trainer = instantiate(
        cfg.trainer, "trainer", callbacks=[ShardTarWriter()], use_distributed_sampler=False
    )
    stats = [cache_split(trainer, module, plan) for plan in plans]
    summary = {"out_dir": str(Path(cfg.cache.out_dir).resolve()), "world_size": trainer.world_size, "splits": stats}
    if trainer.is_global_zero:
        atomic_write_json(Path(cfg.cache.out_dir) / "cache_summary.json", summary)
        for s in stats:
            rate = f"{s['samples_per_s']} samples/s" if s["samples_per_s"] else "nothing to do"
            print(f"cache {s['split']}: {s['samples_written']} of {s['num_samples']} samples written ({rate})")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="cache")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
