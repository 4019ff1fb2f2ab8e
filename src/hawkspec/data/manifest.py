"""The contract between the hidden-state cache writer and the head trainer: shard names and ``manifest.json``.

A cache split folder (``<out_dir>/train`` or ``<out_dir>/val``) holds::

    shard-000000.tar  shard-000001.tar  ...  manifest.json  plan.json

Every shard is a WebDataset tar. Sample ``i`` of the split has the dot-free key ``s000000123`` and the fields

==================  ======================  =======  ==================================================
field               shape                   dtype    meaning
==================  ======================  =======  ==================================================
``hidden.npy``      (rows*W + 1, d)         float16  last-layer hidden state at source s = -1..rows*W-1
``codes.npy``       (rows*W,)               int16    body code indices, -1 at forced (end-of-line) slots
``txt``             -                       str      the caption
``topk_probs.npy``  (rows*W + 1, topk)      float16  target probabilities of the top-k next codes
``topk_idx.npy``    (rows*W + 1, topk)      int16    their code indices
==================  ======================  =======  ==================================================

(the ``topk_*`` fields only when ``topk > 0``). Row ``s + 1`` of ``hidden``/``topk_*`` belongs to source
position ``s`` (row 0 is the image-start token), exactly the convention of :mod:`hawkspec.heads.offsets`.

``manifest.json`` is written last, once every shard of the split exists; a reader takes the shard list from
it and nothing else, and refuses a cache made by another backbone (:func:`check_compatible`). Every shard's entry
carries the size and SHA-256 measured when it was written (copied from its record ``shard-XXXXXX.tar.json``); the
reader checks both (:func:`stream_digest`) before it uses a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
HIDDEN_DTYPE = "float16"


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000007.tar``."""
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    """WebDataset ``__key__`` of sample ``index`` of a split (dot-free): ``s000000123``."""
    return f"s{index:09d}"


def key_index(key: str) -> int:
    """Inverse of :func:`sample_key`."""
    return int(key[1:])


def stream_digest(stream, block: int = 1 << 20) -> tuple[int, str]:
    """``(bytes read, SHA-256 hex digest)`` of a binary stream, read from where it stands to its end."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: stream.read(block), b""):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename (readers never see half a file)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


@dataclass
class ShardManifest:
    """What a cache split holds and which model made it.

    Attributes:
        num_samples: Samples in the split (the sum of the shard counts).
        shards: ``[{"name": "shard-000000.tar", "count": 128, "bytes": 5120, "sha256": "..."}, ...]`` in index
            order; size and SHA-256 as measured when the shard was written.
        hidden_size: d, width of ``hidden.npy``.
        dtype: Storage dtype of ``hidden.npy`` (``"float16"``).
        backbone: Backbone name (``Backbone.name``).
        revision: Backbone weights revision.
        grid: ``{"rows", "cols", "eol"}`` of the image layout.
        tokens_per_row: W, end-of-line included.
        num_codes: K, the codebook size.
        source: ``"self"`` (the backbone's own samples) or ``"dataset"`` (tokenized procedural images).
        seed: Seed of this split.
        topk: Cached top-k of the target distribution per position; 0 when not cached.
        split: ``"train"`` or ``"val"``.
        shard_size: Samples per shard (the last may hold fewer).
        sampling: The sampling config of the self-generated sequences and of the top-k target.
        distill_target: How the cached top-k distribution was computed.
        version: Manifest format version.
    """

    num_samples: int
    shards: list[dict]
    hidden_size: int
    dtype: str
    backbone: str
    revision: str
    grid: dict
    tokens_per_row: int
    num_codes: int
    source: str
    seed: int
    topk: int
    split: str = "train"
    shard_size: int = 0
    sampling: dict = field(default_factory=dict)
    distill_target: str = ""
    version: int = MANIFEST_VERSION

    @property
    def sequence_length(self) -> int:
        """Source positions per sample: rows*W + 1."""
        return self.grid["rows"] * self.tokens_per_row + 1

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def read(cls, folder: str | Path, require_shards: bool = True) -> "ShardManifest":
        """Read and check ``folder/manifest.json``: the counts must add up and (``require_shards``) every listed
        shard must exist."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {folder}: point the shard folder at the output of `hawkspec-cache` "
                "(`cache.out_dir`, with train/ and val/ inside); an unfinished cache run has no manifest yet, rerun it"
            )
        try:
            raw = json.loads(path.read_text())
            manifest = cls(**raw)
            total = sum(int(s["count"]) for s in manifest.shards)
            if not all(isinstance(s.get("name"), str) for s in manifest.shards):
                raise ValueError("a shard entry has no file name")
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a hawkspec shard manifest ({type(e).__name__}: {e}): it is corrupt or was "
                             "edited; rerun the `hawkspec-cache` command that wrote it (it rewrites the manifest)") from e
        if manifest.version != MANIFEST_VERSION:
            raise ValueError(f"{path} has manifest version {manifest.version}; this hawkspec reads {MANIFEST_VERSION}")
        if manifest.dtype != HIDDEN_DTYPE:
            raise ValueError(f"{path}: dtype={manifest.dtype!r}, expected {HIDDEN_DTYPE!r}")
        if total != manifest.num_samples:
            raise ValueError(f"{path}: shard counts add up to {total} but num_samples={manifest.num_samples}")
        missing = [s["name"] for s in manifest.shards if not (folder / s["name"]).is_file()]
        if missing and require_shards:
            raise FileNotFoundError(f"{path} lists shards that do not exist: {missing[:5]}")
        return manifest

    def urls(self, folder: str | Path) -> list[str]:
        """Absolute paths of the shards, in index order."""
        folder = Path(folder).resolve()
        return [str(folder / s["name"]) for s in self.shards]

    def counts(self) -> list[int]:
        return [int(s["count"]) for s in self.shards]


def check_compatible(manifest: ShardManifest, identity: dict, where: str | Path) -> None:
    """Raise a ValueError naming every manifest field that disagrees with the backbone.

    Args:
        manifest: The cache's manifest.
        identity: :meth:`hawkspec.backbones.base.Backbone.identity` of the backbone the heads are built for.
        where: The manifest's folder, for the message.
    """
    have = {
        "backbone": manifest.backbone,
        "revision": manifest.revision,
        "hidden_size": manifest.hidden_size,
        "grid": manifest.grid,
        "num_codes": manifest.num_codes,
    }
    bad = [f"{k}={have[k]!r} (backbone has {identity[k]!r})" for k in have if have[k] != identity[k]]
    if bad:
        raise ValueError(
            f"the shards in {where} were cached from another backbone: manifest {', '.join(bad)}. "
            "Re-run `hawkspec-cache` with this backbone, or set `backbone` to the one the cache was made with"
        )
