"""The hidden-state cache writer: shard layout, contents, determinism, resumption."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import Callback

from hawkspec.cache.plan import CachePlan
from hawkspec.cache.teacher import body_codes, teacher_forced_states
from hawkspec.data.manifest import ShardManifest, key_index, sample_key
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig


def read_samples(folder: Path) -> dict[str, dict]:
    """Every sample of every shard in a split folder, by key (through the manifest)."""
    m = ShardManifest.read(folder)
    out = {}
    for url in m.urls(folder):
        for s in wds.WebDataset(url, shardshuffle=False).decode():
            assert s["__key__"] not in out, f"duplicate key {s['__key__']}"
            out[s["__key__"]] = s
    return out


def plan(n=10, size=4, **kw) -> CachePlan:
    args = dict(out_dir=Path("/tmp/none"), split="train", num_samples=n, shard_size=size, batch_size=3, seed=0,
                source="self", topk=0, identity={"num_codes": 512})
    return CachePlan(**{**args, **kw})


def test_shards_partition_the_samples_for_any_world_size():
    p = plan(n=10, size=4)
    assert p.num_shards == 3 and [p.shard_range(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    for world in (1, 2, 3, 5):
        got = sorted(i for r in range(world) for i in p.assigned(r, world))
        assert got == [0, 1, 2]  # every shard exactly once, no padding
    assert p.shard_seed(1) == plan(n=99, size=4).shard_seed(1) != p.shard_seed(2)


@pytest.mark.parametrize("kw, key", [
    ({"n": 0}, "cache.num_samples"), ({"size": 0}, "cache.shard_size"), ({"batch_size": 0}, "cache.batch_size"),
    ({"source": "web"}, "cache.source"), ({"topk": 513}, "cache.topk"),
])
def test_bad_cache_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        plan(**kw).validate()


def test_cache_contents_layout_and_manifest(tiny_cache, random_backbone):
    folder = Path(tiny_cache) / "train"
    samples = read_samples(folder)
    assert sorted(samples) == [sample_key(i) for i in range(12)]
    grid, d = random_backbone.grid, random_backbone.hidden_size
    for s in samples.values():
        assert s["hidden.npy"].shape == (grid.length + 1, d) and s["hidden.npy"].dtype == np.float16
        assert s["codes.npy"].shape == (grid.length,) and s["codes.npy"].dtype == np.int16
        assert (s["codes.npy"][grid.forced_mask().numpy()] == -1).all()
        assert (s["codes.npy"][~grid.forced_mask().numpy()] >= 0).all()
        assert s["topk_probs.npy"].shape == s["topk_idx.npy"].shape == (grid.length + 1, 8)
        assert isinstance(s["txt"], str) and s["txt"].startswith("a ")
    m = json.loads((folder / "manifest.json").read_text())
    assert m["num_samples"] == 12 and [s["count"] for s in m["shards"]] == [4, 4, 4]
    assert m["hidden_size"] == d and m["dtype"] == "float16" and m["num_codes"] == 512 and m["topk"] == 8
    assert m["grid"] == {"rows": 4, "cols": 4, "eol": True} and m["tokens_per_row"] == 5
    assert m["backbone"] == "tiny" and m["revision"] == random_backbone.revision and m["source"] == "self"
    assert not list(folder.glob("*.tmp"))


def test_body_tokens_match_the_tiny_layout(random_backbone):
    codes = torch.randint(0, 512, (2, 4, 4))
    want = random_backbone.layout.image_sequence(codes)[:, 1:-1]  # drop image start / end
    assert torch.equal(random_backbone.body_ids(codes), want)
    assert (body_codes(random_backbone.grid, codes)[:, random_backbone.grid.forced_mask()] == -1).all()


def test_teacher_forced_states_reproduce_greedy_decoding(random_backbone, prompts):
    """Greedy AR picks argmax at every step, so the teacher-forced state at source s must pick the code at s+1,
    and the cached top-1 of the greedy target is that code too (rows shifted by one: row s+1 <-> source s)."""
    greedy = SamplingConfig(temperature=0, top_k=None, cfg_scale=1.0)
    out = ar_generate(random_backbone, prompts, greedy)
    hidden, probs, idx = teacher_forced_states(random_backbone, prompts, out.codes, greedy, topk=3)
    codes = body_codes(random_backbone.grid, out.codes)  # (B, L)
    pred = random_backbone.code_logits(hidden).argmax(-1)  # (B, L+1): row i predicts body position i
    sampled = codes >= 0
    assert torch.equal(pred[:, :-1][sampled], codes[sampled])
    assert torch.equal(idx[:, :-1, 0][sampled], codes[sampled])
    assert torch.all(probs[:, :, 0] == 1)


def test_cfg_topk_target_is_the_sampling_target(random_backbone, prompts):
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=3.0)
    codes = ar_generate(random_backbone, prompts, s, torch.Generator().manual_seed(0)).codes
    _, probs, idx = teacher_forced_states(random_backbone, prompts, codes, s, topk=20)
    assert torch.allclose(probs[..., :16].sum(-1), torch.ones(()), atol=1e-4)  # top-16 truncation is applied
    assert (probs[..., 16:] == 0).all()


def test_dataset_source_tokenizes_procedural_images(tmp_path, random_backbone, write_cache):
    p = write_cache(random_backbone, tmp_path, num_samples=5, shard_size=2, source="dataset")
    samples = read_samples(p.out_dir)
    assert sorted(samples) == [sample_key(i) for i in range(5)]
    from hawkspec.cache.sources import dataset_codes

    codes = body_codes(random_backbone.grid, dataset_codes(random_backbone, 0, 0, 5))
    for key, s in samples.items():
        assert np.array_equal(s["codes.npy"], codes[key_index(key)].numpy())


def test_shards_are_a_deterministic_function_of_seed_and_index(tmp_path, random_backbone, write_cache, tiny_cache):
    again = write_cache(random_backbone, tmp_path, num_samples=12, topk=8, seed=0)
    for i in range(3):
        assert again.path(i).read_bytes() == (Path(tiny_cache) / "train" / again.path(i).name).read_bytes()
    other = write_cache(random_backbone, tmp_path / "other", num_samples=12, topk=8, seed=5)
    assert other.path(0).read_bytes() != again.path(0).read_bytes()


class CrashAfter(Callback):
    """Simulates a crash: raises once ``n`` shards have been written."""

    def __init__(self, n: int):
        self.n, self.count = n, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.count += 1
        if self.count == self.n:
            raise RuntimeError("simulated crash")


def test_interrupted_cache_resumes_to_exactly_the_requested_samples(tmp_path, random_backbone, write_cache, tiny_cache):
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_cache(random_backbone, tmp_path, num_samples=12, topk=8, callbacks=[CrashAfter(2)])
    folder = tmp_path / "train"
    assert sorted(p.name for p in folder.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (folder / "manifest.json").exists()  # a reader refuses the unfinished cache
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardManifest.read(folder)
    # a partial shard left by a crash mid-write, and a finished shard that got lost
    (folder / "shard-000002.tar.tmp").write_bytes(b"partial")
    (folder / "shard-000001.tar").unlink()
    first = (folder / "shard-000000.tar").stat().st_mtime_ns
    p = write_cache(random_backbone, tmp_path, num_samples=12, topk=8)
    assert (folder / "shard-000000.tar").stat().st_mtime_ns == first  # finished shards are skipped
    assert sorted(read_samples(folder)) == [sample_key(i) for i in range(12)]
    assert ShardManifest.read(folder).num_samples == 12 and not list(folder.glob("*.tmp"))
    for i in range(p.num_shards):  # identical to an uninterrupted run
        assert p.path(i).read_bytes() == (Path(tiny_cache) / "train" / p.path(i).name).read_bytes()


def test_rerun_with_other_settings_into_the_same_folder_is_refused(tmp_path, random_backbone, write_cache):
    write_cache(random_backbone, tmp_path, num_samples=4, shard_size=4)
    with pytest.raises(ValueError, match="seed"):
        write_cache(random_backbone, tmp_path, num_samples=4, shard_size=4, seed=3)
