"""``hawkspec-cache``: run the frozen backbone teacher-forced and write hidden-state shards (train/ and val/).

``mode=verify`` checks a finished cache instead: every expected split (train; val unless the cache was made with
``cache.val_samples=0``) must have a readable manifest, and every shard its size, SHA-256 and sample count; it
exits 1 naming each missing split (and file) and each damaged shard; rerunning the writing command rewrites
just those.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.cache.plan import PLAN, CachePlan
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


#: The splits a cache has: train always, val unless it was made with ``cache.val_samples=0``.
SPLITS = ("train", "val")
SUMMARY = "cache_summary.json"


def expected_splits(out_dir: Path) -> tuple[list[str], list[str]]:
    """``(expected, notes)``: the splits ``mode=verify`` must find under ``out_dir``.

    ``train`` always; ``val`` (and any other split) when its folder exists or ``cache_summary.json`` (written by
    every finished writing run) lists it. A cache made with ``cache.val_samples=0`` has neither, so it has no val
    split to miss.
    """
    notes, listed = [], set()
    summary = out_dir / SUMMARY
    if summary.is_file():
        try:
            listed = {str(s["split"]) for s in json.loads(summary.read_text())["splits"]}
        except (ValueError, KeyError, TypeError) as e:
            notes.append(f"{summary} is unreadable ({type(e).__name__}: {e}); the splits are taken from the folders")
    on_disk = {p.name for p in out_dir.iterdir() if p.is_dir()
               and (p.name in SPLITS or any((p / f).is_file() for f in (MANIFEST, PLAN)))}
    found = {"train"} | listed | on_disk
    return sorted(found, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)), notes


def verify(out_dir: Path) -> dict:
    """``mode=verify``: check every expected split under ``out_dir`` (:func:`expected_splits`): its manifest, and
    every shard's size, SHA-256 and sample count (:func:`~hawkspec.cache.runner.verify_split`).

    Prints one line per split (which splits were expected and found). Raises, naming each missing or unreadable
    split (and its file) and each damaged shard; :class:`~hawkspec.data.shards.CorruptShardError` exits 1.
    """
    if not out_dir.is_dir() or not any((out_dir / s).is_dir() for s in SPLITS) and not (out_dir / SUMMARY).is_file():
        raise FileNotFoundError(f"cache.out_dir={out_dir} holds no cache (no train/ or val/ folder): point it at the "
                                "output of `hawkspec-cache`")
    expected, notes = expected_splits(out_dir)
    for note in notes:
        print(f"verify {out_dir}: note: {note}")
    reports, missing = [], {}
    for split in expected:
        folder = out_dir / split
        if not folder.is_dir():
            missing[split] = f"the folder {folder} is missing"
        elif not (folder / MANIFEST).is_file():
            missing[split] = (f"{folder / MANIFEST} is missing (the writing run did not finish, or the file was "
                              "deleted): the split cannot be read")
        else:
            try:
                reports.append(verify_split(folder) | {"split": split})
            except (ValueError, OSError) as e:
                missing[split] = f"{folder / MANIFEST} is unreadable: {e}"
    found = [r["split"] for r in reports]
    print(f"verify {out_dir}: expected splits {', '.join(expected)}; found {', '.join(found) or 'none'}"
          + ("" if "val" in expected else " (no val split: a cache made with cache.val_samples=0)"))
    for split, why in missing.items():
        print(f"verify {out_dir / split}: FAILED: {why}")
    for r in reports:
        state = "ok" if not r["damaged"] else f"{len(r['damaged'])} damaged"
        print(f"verify {r['folder']}: {r['num_shards']} shards, {r['num_samples']} samples: {state}")
    bad = {f"{r['folder']}/{name}": why for r in reports for name, why in r["damaged"].items()}
    if bad or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} split(s) missing or unreadable in cache.out_dir={out_dir}:\n"
                         + "\n".join(f"  {k}: {v}" for k, v in missing.items()))
        if bad:
            parts.append(f"{len(bad)} damaged shard(s) in cache.out_dir={out_dir}:\n"
                         + "\n".join(f"  {k}: {v}" for k, v in bad.items()))
        raise CorruptShardError("\n".join(parts) + "\nRerun the `hawkspec-cache` command that wrote it (same "
                                "settings): it rewrites only the damaged shards and the missing manifests")
    return {"out_dir": str(out_dir), "expected": expected, "splits": reports}


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
        atomic_write_json(Path(cfg.cache.out_dir) / SUMMARY, summary)
        for s in stats:
            rate = f"{s['samples_per_s']} samples/s" if s["samples_per_s"] else "nothing to do"
            print(f"cache {s['split']}: {s['samples_written']} of {s['num_samples']} samples written ({rate})")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="cache")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
