"""Truncated, corrupted and lying shards and manifests: the cache verifies what it claims."""

import json
import shutil

import numpy as np
import pytest

from hawkspec.cache.predict import ShardData
from hawkspec.cache.runner import verify_split
from hawkspec.cache.writer import write_shard
from hawkspec.data.manifest import MANIFEST, ShardManifest
from hawkspec.data.shards import CorruptShardError, ShardDataModule
from hawkspec.io import NonFiniteError


@pytest.fixture
def cache(tmp_path, random_backbone, write_cache):
    """A fresh 12-sample train split (3 shards of 4) and the plan that wrote it."""
    plan = write_cache(random_backbone, tmp_path / "c", num_samples=12, shard_size=4)
    return plan


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.glob("shard-*.tar"))}


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_rerun_rewrites_exactly_the_damaged_shard(cache, random_backbone, write_cache, damage):
    """A truncated shard used to pass as complete ("nothing to do") and the manifest took its new size.
    Expect: the rerun rewrites only that shard, byte-identical to the original; the others are not touched."""
    before = snapshot(cache.out_dir)
    shard = cache.path(1)
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    assert "shard-000001.tar" in verify_split(cache.out_dir)["damaged"]
    write_cache(random_backbone, cache.out_dir.parent, num_samples=12, shard_size=4)
    after = snapshot(cache.out_dir)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert after["shard-000000.tar"][1] == before["shard-000000.tar"][1]  # untouched
    assert after["shard-000002.tar"][1] == before["shard-000002.tar"][1]
    assert verify_split(cache.out_dir)["damaged"] == {}


def test_the_manifest_records_size_and_checksum_at_write_time(cache):
    """Expect: every manifest entry carries the written size and SHA-256, which verify checks."""
    m = ShardManifest.read(cache.out_dir)
    assert all(len(s["sha256"]) == 64 and s["bytes"] == (cache.out_dir / s["name"]).stat().st_size for s in m.shards)


def test_a_lying_manifest_fails_the_exact_pass_naming_the_shard(tmp_path, cache, random_backbone):
    """A manifest that understates a shard's count made the exact pass skip samples silently.
    Expect: CorruptShardError naming the shard and both counts."""
    folder = tmp_path / "lying" / "train"
    shutil.copytree(cache.out_dir, folder)
    raw = json.loads((folder / MANIFEST).read_text())
    raw["shards"][0]["count"] = 3
    raw["num_samples"] = 11
    (folder / MANIFEST).write_text(json.dumps(raw))
    dm = ShardDataModule(str(folder), batch_size=4, resampled=False, num_workers=0, identity=random_backbone.identity())
    with pytest.raises(CorruptShardError, match=r"shard-000000\.tar holds 4 samples but its manifest says 3"):
        list(dm.train_dataloader())
    assert "shard-000000.tar" in verify_split(folder)["damaged"]


def test_verify_cli_names_damaged_shards_and_passes_an_intact_cache(tmp_path, cache):
    """`hawkspec-cache mode=verify`: exit 0 on an intact cache; exit 1 naming each damaged shard."""
    from hawkspec.testing import run_cli

    root = cache.out_dir.parent
    proc = run_cli("hawkspec-cache", "mode=verify", f"cache.out_dir={root}", f"hydra.run.dir={tmp_path / 'v1'}")
    assert "3 shards, 12 samples: ok" in proc.stdout
    cache.path(2).write_bytes(cache.path(2).read_bytes()[:100])
    proc = run_cli("hawkspec-cache", "mode=verify", f"cache.out_dir={root}", f"hydra.run.dir={tmp_path / 'v2'}",
                   ok=False)
    assert "shard-000002.tar" in proc.stderr and "truncated" in proc.stderr


def test_the_writer_refuses_non_finite_hidden_states_naming_the_sample(tmp_path, cache):
    """Expect: NonFiniteError naming the sample key; no shard file and no record written."""
    hidden = np.zeros((2, 3, 4), np.float16)
    hidden[1, 2, 0] = np.nan
    shard = ShardData(index=7, keys=["s000000028", "s000000029"], captions=["a", "b"], hidden=hidden,
                      codes=np.zeros((2, 2), np.int16))
    with pytest.raises(NonFiniteError, match="s000000029"):
        write_shard(cache, shard)
    assert not cache.path(7).exists() and not cache.record_path(7).exists()
