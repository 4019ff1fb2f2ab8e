"""Streaming the cache: exact and resampled epochs, per-rank splits, epoch-aware shuffling, bad shards."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from hawkspec.data.manifest import sample_key
from hawkspec.data.shards import CorruptShardError, ShardDataModule


def datamodule(root, identity=None, **kw) -> ShardDataModule:
    args = dict(train_dir=f"{root}/train", val_dir=f"{root}/val", batch_size=5, num_workers=0, identity=identity)
    return ShardDataModule(**{**args, **kw})


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["keys"]]


def as_rank(dm: ShardDataModule, monkeypatch, rank: int, world: int) -> ShardDataModule:
    """Pretend to be rank ``rank`` of ``world`` (what Lightning and torch.distributed tell the pipeline)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    return dm


def test_exact_epoch_sees_every_sample_once(tiny_cache, random_backbone):
    dm = datamodule(tiny_cache, random_backbone.identity(), resampled=False)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 3 shards of 4, batch 5, one worker: ceil(12/5)
    assert sorted(keys_of(batches)) == [sample_key(i) for i in range(12)]
    b = batches[0]
    L = random_backbone.grid.length
    assert b["hidden"].dtype == torch.float16 and b["hidden"].shape[1:] == (L + 1, random_backbone.hidden_size)
    assert b["codes"].dtype == torch.int16 and b["codes"].shape[1:] == (L,)
    assert "topk_probs" not in b  # only loaded for distillation
    assert sorted(keys_of(dm.val_dataloader())) == [sample_key(i) for i in range(4)]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_get_disjoint_shards_that_cover_the_split(tiny_cache, monkeypatch, workers, tmp_path, write_cache,
                                                         random_backbone):
    write_cache(random_backbone, tmp_path, num_samples=16, shard_size=4)
    seen = []
    for rank in range(2):
        dm = as_rank(datamodule(tmp_path, resampled=False, num_workers=workers, val_dir=None), monkeypatch, rank, 2)
        loader = dm.train_dataloader()
        keys = keys_of(loader)
        assert len(keys) == 8
        seen += keys
    assert sorted(seen) == [sample_key(i) for i in range(16)]  # no duplicates, no gaps


def test_exact_mode_refuses_ranks_with_unequal_batches(tiny_cache, monkeypatch):
    dm = as_rank(datamodule(tiny_cache, resampled=False, batch_size=4), monkeypatch, 0, 2)  # 3 shards -> 8 / 4
    with pytest.raises(ValueError, match="data.resampled"):
        dm.train_dataloader()


def test_resampled_epoch_has_the_requested_length(tiny_cache):
    dm = datamodule(tiny_cache, resampled=True, samples_per_epoch=30, num_workers=2, shuffle_buffer=8)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(len(b["keys"]) == 5 for b in batches)
    assert set(keys_of(batches)) <= {sample_key(i) for i in range(12)}


def test_shuffle_depends_on_the_epoch(tiny_cache):
    dm = datamodule(tiny_cache, resampled=False, shuffle_buffer=12, batch_size=12)
    first = keys_of(dm.train_dataloader())
    assert keys_of(dm.train_dataloader()) == first  # same seed and epoch -> same order
    dm.set_epoch(1)
    second = keys_of(dm.train_dataloader())
    assert sorted(second) == sorted(first) and second != first


def test_distillation_loads_the_top_k(tiny_cache):
    batch = next(iter(datamodule(tiny_cache, topk=True, resampled=False).train_dataloader()))
    assert batch["topk_probs"].shape == batch["topk_idx"].shape == (5, 21, 8)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, fields", [
    ({"hidden_size": 32}, ["hidden_size=32", "hidden_size"]),
    ({"rows": 3, "cols": 3}, ["grid=", "'rows': 3"]),
])
def test_shards_of_another_backbone_are_refused_naming_the_fields(tmp_path, make_backbone, write_cache,
                                                                  random_backbone, kwargs, fields):
    write_cache(make_backbone(**kwargs), tmp_path, num_samples=2, shard_size=2)
    with pytest.raises(ValueError) as err:
        datamodule(tmp_path, random_backbone.identity(), val_dir=None)
    for f in fields:
        assert f in str(err.value)
    assert "revision" not in str(err.value) or kwargs  # message lists only the fields that differ


def test_a_corrupt_shard_is_named(tmp_path, tiny_cache):
    shutil.copytree(tiny_cache, tmp_path / "c")
    shard = tmp_path / "c" / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[:1024] = b"\x17" * 1024  # clobber the first tar header, same size
    shard.write_bytes(bytes(data))
    dm = datamodule(tmp_path / "c", resampled=False)
    with pytest.raises(CorruptShardError, match="shard-000001.tar"):
        keys_of(dm.train_dataloader())


def test_a_truncated_shard_is_named_up_front(tmp_path, tiny_cache):
    shutil.copytree(tiny_cache, tmp_path / "c")
    shard = tmp_path / "c" / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])
    with pytest.raises(CorruptShardError, match="shard-000002.tar"):
        datamodule(tmp_path / "c")


def test_a_missing_manifest_or_folder_is_explained(tmp_path, tiny_cache):
    with pytest.raises(FileNotFoundError, match="data.train_dir"):
        datamodule(tmp_path / "nowhere")
    shutil.copytree(tiny_cache, tmp_path / "c")
    (tmp_path / "c" / "val" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        datamodule(tmp_path / "c")


def test_distillation_without_cached_top_k_names_the_key(tmp_path, write_cache, random_backbone):
    write_cache(random_backbone, tmp_path, num_samples=2, shard_size=2, topk=0)
    with pytest.raises(ValueError, match="distill_weight"):
        datamodule(tmp_path, topk=True, val_dir=None)
