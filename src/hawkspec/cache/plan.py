"""Which samples go into which shard, and where: the unit of work of the cache writer is one *shard*.

Shard ``i`` of a split holds samples ``[i*S, min((i+1)*S, N))`` (S = ``cache.shard_size``, N the split's sample
count), and everything in it is a function of ``(seed, i)`` and the plan (batch size, sampling config, backbone)
only — not of the number of processes, nor of which ones ran before. So a rerun can skip every shard that
exists, and any process may write any shard: under DDP rank ``r`` of ``w`` takes the pending shards
``i ≡ r (mod w)`` (no padding, no duplicates). A shard is written to ``shard-XXXXXX.tar.tmp``; its size, SHA-256
and sample count go to ``shard-XXXXXX.tar.json`` (the shard's record), then the tar is renamed into place. A
shard counts as written when both exist. Every run first checks every written shard against its record
(:meth:`CachePlan.damaged`) and deletes the damaged ones, so a rerun rewrites exactly those; the manifest, written
once all shards exist, copies the records (never the sizes found on disk).

``plan.json`` pins the plan of a folder: rerunning into the same ``cache.out_dir`` with different settings is
an error instead of a silent mix of two caches.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hawkspec.data.manifest import HIDDEN_DTYPE, ShardManifest, shard_name, stream_digest, write_json_atomic

PLAN = "plan.json"
SOURCES = ("self", "dataset", "images")
#: How the cached top-k distribution is computed (recorded in the manifest).
DISTILL_TARGET = (
    "hawkspec.decoding.sampling.target_probs of the CFG-combined code logits under `sampling` "
    "(CFG, then top-k truncation, then temperature), exactly the target every decoder verifies against"
)


@dataclass(frozen=True)
class CachePlan:
    """The layout of one cache split.

    Attributes:
        out_dir: The split's folder (``<cache.out_dir>/<split>``).
        split: ``"train"`` or ``"val"``.
        num_samples: N, samples in the split.
        shard_size: S, samples per shard.
        batch_size: Sequences per generation / teacher-forcing batch (part of the plan: with ``source=self`` the
            random draws depend on how samples are batched).
        seed: Seed of the split (captions, images, sampling).
        source: ``"self"`` or ``"dataset"``.
        topk: Cached top-k of the target distribution; 0 for none.
        sampling: The sampling config as a dict.
        identity: The backbone's :meth:`~hawkspec.backbones.base.Backbone.identity`.
        images: ``cache.images`` (``path``, ``coco_annotations``, ``seed``) for ``source="images"``
            (:mod:`hawkspec.data.image_text`); empty otherwise.
    """

    out_dir: Path
    split: str
    num_samples: int
    shard_size: int
    batch_size: int
    seed: int
    source: str
    topk: int
    sampling: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    def validate(self) -> "CachePlan":
        """Raise a ValueError naming the ``cache.*`` key of a bad value."""
        key = "cache.num_samples" if self.split == "train" else "cache.val_samples"
        if self.num_samples < 1:
            raise ValueError(f"{key} must be >= 1, got {self.num_samples}")
        if self.shard_size < 1:
            raise ValueError(f"cache.shard_size must be >= 1, got {self.shard_size}")
        if self.batch_size < 1:
            raise ValueError(f"cache.batch_size must be >= 1, got {self.batch_size}")
        if self.source not in SOURCES:
            raise ValueError(f"cache.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "images" and not self.images.get("path"):
            raise ValueError("cache.source=images needs cache.images.path (a folder of x.jpg + x.txt pairs, or COCO "
                             "train2017 with cache.images.coco_annotations)")
        num_codes = self.identity.get("num_codes", 0)
        if not 0 <= self.topk <= num_codes:
            raise ValueError(f"cache.topk must be between 0 (off) and the codebook size {num_codes}, got {self.topk}")
        if num_codes > np.iinfo(np.int16).max + 1:
            raise ValueError(f"codes are stored as int16; a codebook of {num_codes} codes does not fit")
        return self

    # ----------------------------------------------------------------------------------------- layout
    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, index: int) -> tuple[int, int]:
        """Sample indices ``[start, stop)`` of shard ``index``."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range: the plan has {self.num_shards} shards")
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def shard_seed(self, index: int) -> int:
        """The seed of shard ``index``'s random draws: a function of ``(seed, index)`` only."""
        return int(np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0] >> 1)

    def path(self, index: int) -> Path:
        return self.out_dir / shard_name(index)

    def tmp_path(self, index: int) -> Path:
        """Where shard ``index`` is written before the atomic rename (never listed by a reader)."""
        return self.out_dir / (shard_name(index) + ".tmp")

    def record_path(self, index: int) -> Path:
        """The shard's record ``shard-XXXXXX.tar.json``: ``{"bytes", "sha256", "count"}`` measured at write time."""
        return self.out_dir / (shard_name(index) + ".json")

    def record(self, index: int) -> dict | None:
        """The shard's record, or None when it is missing or unreadable."""
        try:
            return json.loads(self.record_path(index).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_done(self, index: int) -> bool:
        """Shard and record exist (cheap; :meth:`check` reads the bytes)."""
        return self.path(index).is_file() and self.record_path(index).is_file()

    def check(self, index: int) -> str | None:
        """What is wrong with written shard ``index`` (size, checksum, count against its record), or None."""
        rec = self.record(index)
        if rec is None:
            return "its record is missing or unreadable"
        a, b = self.shard_range(index)
        problem = check_file(self.path(index), rec)
        if problem is None and rec.get("count") != b - a:
            problem = f"its record counts {rec.get('count')} samples, the plan {b - a}"
        return problem

    def damaged(self) -> dict[int, str]:
        """``{index: problem}`` of every written shard that fails :meth:`check` (reads every shard)."""
        out = {}
        for i in range(self.num_shards):
            if self.path(i).is_file() or self.record_path(i).is_file():
                problem = self.check(i) if self.path(i).is_file() else "the shard file is missing"
                if problem:
                    out[i] = problem
        return out

    def repair(self) -> dict[int, str]:
        """Delete every damaged shard (and its record) so that the run rewrites it; returns what was wrong."""
        bad = self.damaged()
        for i in bad:
            self.path(i).unlink(missing_ok=True)
            self.record_path(i).unlink(missing_ok=True)
        return bad

    def assigned(self, rank: int, world_size: int) -> list[int]:
        """Shards of rank ``rank`` of ``world_size``: ``rank, rank + world_size, ...`` (no padding)."""
        return list(range(rank, self.num_shards, world_size))

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Assigned shards that are not written yet."""
        return [i for i in self.assigned(rank, world_size) if not self.is_done(i)]

    # ----------------------------------------------------------------------------------------- files
    def fingerprint(self) -> dict:
        """Everything that determines the shards' contents."""
        out = asdict(self)
        out.pop("out_dir")
        if not out["images"]:  # plans of the other sources read as before the field existed
            out.pop("images")
        # sampling keys added later read as before while at their defaults (the target is the same)
        out["sampling"] = {k: v for k, v in dict(out["sampling"]).items()
                           if (k, v) not in (("top_p", None), ("top_p", 1.0), ("cfg_off_below_one", False))}
        return out

    def claim(self) -> None:
        """Create the folder and pin the plan in ``plan.json``; refuse a folder holding another plan's shards."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / PLAN
        mine = json.loads(json.dumps(self.fingerprint()))  # normalise tuples etc. as JSON would
        if path.is_file():
            theirs = json.loads(path.read_text())
            diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
            if diff:
                details = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                raise ValueError(
                    f"cache.out_dir {self.out_dir.parent} already holds a {self.split} cache made with other settings "
                    f"({details}); pick another `cache.out_dir` or delete that folder"
                )
        else:
            write_json_atomic(path, mine)

    def manifest(self) -> ShardManifest:
        """The manifest of the finished split; raises if a shard is missing."""
        missing = [shard_name(i) for i in range(self.num_shards) if not self.is_done(i)]
        if missing:
            raise RuntimeError(f"cannot write the manifest of {self.out_dir}: shards {missing[:5]} are missing")
        grid = self.identity["grid"]
        return ShardManifest(
            num_samples=self.num_samples,
            shards=[
                {"name": shard_name(i), "count": rec["count"], "bytes": rec["bytes"], "sha256": rec["sha256"]}
                for i in range(self.num_shards) for rec in [self.record(i)]
            ],
            hidden_size=self.identity["hidden_size"],
            dtype=HIDDEN_DTYPE,
            backbone=self.identity["backbone"],
            revision=self.identity["revision"],
            grid=grid,
            tokens_per_row=grid["cols"] + int(grid["eol"]),
            num_codes=self.identity["num_codes"],
            source=self.source,
            seed=self.seed,
            topk=self.topk,
            split=self.split,
            shard_size=self.shard_size,
            sampling=self.sampling,
            distill_target=DISTILL_TARGET if self.topk else "",
        )


def file_digest(path: Path) -> tuple[int, str]:
    """``(size in bytes, SHA-256 hex digest)`` of a file."""
    with open(path, "rb") as f:
        return stream_digest(f)


def check_file(path: Path, record: dict) -> str | None:
    """What differs between ``path`` and ``record`` (``bytes``, ``sha256``), or None when it matches."""
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        return f"it has {size} bytes, {record['bytes']} were written (truncated or overwritten)"
    if "sha256" in record and file_digest(path)[1] != record["sha256"]:
        return "its SHA-256 differs from the one recorded when it was written (corrupted)"
    return None
