"""No silent wrongs (issue 27, items 1, 2 and 9): a cache split that is missing or unreadable fails
`hawkspec-cache mode=verify`; a shard altered after it was written (same size, finite values) is refused by the
reader by its SHA-256, in every streaming mode; a truncated ``*.safetensors`` is named, with the command that
remakes it. The console scripts run in-process (their Hydra ``main``), so a failure is a ``SystemExit(1)``."""

import io
import json
import logging
import shutil
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hawkspec.cache.runner import verify_split
from hawkspec.data.manifest import MANIFEST, sample_key
from hawkspec.data.shards import CorruptShardError, ShardDataModule
from hawkspec.io import CorruptWeightsError, load_safetensors, safetensors_problem

ASSETS = Path(__file__).resolve().parents[2] / "src" / "hawkspec" / "assets"


def run_main(main, capsys, monkeypatch, *overrides: str) -> SimpleNamespace:
    """Run a console script's Hydra ``main`` in this process; returns its exit code, stdout and stderr."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["hawkspec", *overrides])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:  # Hydra configured logging for the job: put the test session's back
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    out = capsys.readouterr()
    return SimpleNamespace(code=code, out=out.out, err=out.err)


@pytest.fixture
def cache_copy(tmp_path, disk_cache) -> Path:
    """A private copy of the finished cache (train: 3 shards of 4, val: 1 shard of 4)."""
    return Path(shutil.copytree(disk_cache, tmp_path / "shards"))


# ------------------------------------------------------------------------------------ 1. mode=verify, every split
def verify_cli(capsys, monkeypatch, root: Path, tmp_path: Path) -> SimpleNamespace:
    from hawkspec.cli.cache import main

    return run_main(main, capsys, monkeypatch, "mode=verify", f"cache.out_dir={root}",
                    f"hydra.run.dir={tmp_path / 'verify'}")


def test_verify_passes_an_intact_cache_and_says_which_splits_it_found(tmp_path, cache_copy, capsys, monkeypatch):
    r = verify_cli(capsys, monkeypatch, cache_copy, tmp_path)
    assert r.code == 0, r.err
    assert "expected splits train, val; found train, val" in r.out
    assert "train: 3 shards, 12 samples: ok" in r.out and "val: 1 shards, 4 samples: ok" in r.out


def test_verify_accepts_a_cache_made_without_a_val_split(tmp_path, cache_copy, capsys, monkeypatch):
    """cache.val_samples=0 writes no val/ folder (and cache_summary.json lists train only): nothing is missing."""
    shutil.rmtree(cache_copy / "val")
    (cache_copy / "cache_summary.json").write_text(json.dumps({"splits": [{"split": "train"}]}))
    r = verify_cli(capsys, monkeypatch, cache_copy, tmp_path)
    assert r.code == 0, r.err
    assert "found train" in r.out and "no val split" in r.out


@pytest.mark.parametrize("damage", ["train manifest deleted", "val manifest unreadable", "val folder deleted"])
def test_verify_fails_naming_a_missing_or_unreadable_split(tmp_path, cache_copy, capsys, monkeypatch, damage):
    """Deleting train/manifest.json used to report only `val: ... ok` and exit 0 (training then failed).
    Expect: exit 1, the split and its file named; the intact split still reported."""
    if damage == "train manifest deleted":
        (cache_copy / "train" / MANIFEST).unlink()
        split, file, why, intact = "train", cache_copy / "train" / MANIFEST, "is missing", "val"
    elif damage == "val manifest unreadable":
        (cache_copy / "val" / MANIFEST).write_text('{"num_samples": 4, "shards": [')
        split, file, why, intact = "val", cache_copy / "val" / MANIFEST, "is unreadable", "train"
    else:  # a finished run lists its splits in cache_summary.json: a val/ folder that vanished is missed
        (cache_copy / "cache_summary.json").write_text(json.dumps({"splits": [{"split": "train"}, {"split": "val"}]}))
        shutil.rmtree(cache_copy / "val")
        split, file, why, intact = "val", cache_copy / "val", "is missing", "train"
    r = verify_cli(capsys, monkeypatch, cache_copy, tmp_path)
    assert r.code == 1
    assert f"  {split}: " in r.err and str(file) in r.err and why in r.err
    assert f"found {intact}" in r.out and f"{cache_copy / split}: FAILED" in r.out
    assert "Rerun the `hawkspec-cache` command" in r.err


# ------------------------------------------------------------------------------------ 2. checksums at read time
def flip_hidden_byte(shard: Path) -> str:
    """Flip the lowest mantissa bit of one float16 in the first sample's ``hidden.npy`` of ``shard``: same size,
    still finite, a different value. Returns that sample's key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".hidden.npy"))
    data = bytearray(shard.read_bytes())
    span = slice(member.offset_data, member.offset_data + member.size)
    before = np.load(io.BytesIO(bytes(data[span])))
    assert before.dtype == np.dtype("<f2")
    data[member.offset_data + member.size - before.nbytes + 2 * 7] ^= 0x01  # low byte of element 7
    shard.write_bytes(bytes(data))
    after = np.load(io.BytesIO(bytes(data[span])))
    assert np.isfinite(after).all() and int((after != before).sum()) == 1  # what size/finiteness checks let through
    return member.name.split(".", 1)[0]


def datamodule(root: Path, **kw) -> ShardDataModule:
    args = dict(train_dir=str(root / "train"), val_dir=None, batch_size=4, num_workers=0, shuffle_buffer=0)
    return ShardDataModule(**{**args, **kw})


def checksum_error(err: str, root: Path, shard: str = "shard-000001.tar") -> None:
    assert f"{root / 'train' / shard} is corrupted" in err
    assert str(root / "train" / MANIFEST) in err and f"{shard}.json" in err
    assert "hawkspec-cache" in err and "mode=verify" in err


def test_a_flipped_byte_is_refused_before_any_sample_of_the_shard_is_used(cache_copy):
    """The reader checked size, count and finiteness, not the SHA-256: training learned from the altered value.
    Expect: CorruptShardError naming the shard, its manifest and record when the shard is opened; no sample of it
    reaches a batch (the samples of the intact shard before it do)."""
    key = flip_hidden_byte(cache_copy / "train" / "shard-000001.tar")
    assert key == sample_key(4)
    loader = datamodule(cache_copy, resampled=False, batch_size=2).train_dataloader()
    seen = []
    with pytest.raises(CorruptShardError) as err:
        for batch in loader:
            seen += batch["keys"]
    checksum_error(str(err.value), cache_copy)
    assert seen and set(seen) <= {sample_key(i) for i in range(4)}  # shard 0's samples flowed, none of shard 1's
    assert "SHA-256" in verify_split(cache_copy / "train")["damaged"]["shard-000001.tar"]


@pytest.mark.parametrize("mode", ["resampled, 2 workers", "exact, 2 workers", "exact, rank 1 of 3"])
def test_the_checksum_holds_under_worker_and_node_splitting(cache_copy, monkeypatch, mode):
    """Expect: the same refusal whichever worker process or rank opens the damaged shard, and in resampled mode."""
    flip_hidden_byte(cache_copy / "train" / "shard-000001.tar")
    if mode == "resampled, 2 workers":  # the 1000-sample shuffle buffer draws ~250 shards before the first batch
        dm = datamodule(cache_copy, resampled=True, num_workers=2, shuffle_buffer=1000)
    elif mode == "exact, 2 workers":  # worker 1 reads shard 1
        dm = datamodule(cache_copy, resampled=False, num_workers=2)
    else:  # rank r of 3 reads shard r only
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "3")
        dm = datamodule(cache_copy, resampled=False)
        dm.trainer = SimpleNamespace(global_rank=1, world_size=3)
    loader = dm.train_dataloader()
    try:
        with pytest.raises(CorruptShardError) as err:
            list(loader)
    finally:  # stop the persistent workers now (left to the garbage collector they time out, 5 s each)
        if getattr(loader.pipeline[0], "_iterator", None) is not None:
            loader.pipeline[0]._iterator._shutdown_workers()
    checksum_error(str(err.value), cache_copy)
    if mode == "exact, rank 1 of 3":  # the other ranks read their intact shards
        monkeypatch.setenv("RANK", "0")
        dm.trainer = SimpleNamespace(global_rank=0, world_size=3)
        assert [k for b in dm.train_dataloader() for k in b["keys"]] == [sample_key(i) for i in range(4)]


def test_hawkspec_train_refuses_a_corrupted_shard(tmp_path, cache_copy, random_backbone_dir, capsys, monkeypatch):
    """`hawkspec-train` on a cache with one altered byte: exit 1 naming the shard file and its manifest."""
    from hawkspec.cli.train import main

    flip_hidden_byte(cache_copy / "train" / "shard-000001.tar")
    r = run_main(main, capsys, monkeypatch, f"backbone.path={random_backbone_dir}", f"shards_dir={cache_copy}",
                 f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=3", "data.batch_size=4", "logger=csv")
    assert r.code == 1
    checksum_error(r.err, cache_copy)


def test_a_manifest_without_checksums_is_read_with_a_warning(cache_copy, caplog):
    """A cache from before checksums were recorded: read unchecked, but not silently."""
    path = cache_copy / "train" / MANIFEST
    raw = json.loads(path.read_text())
    for s in raw["shards"]:
        del s["sha256"]
    path.write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        dm = datamodule(cache_copy, resampled=False)
    assert str(path) in caplog.text and "without a checksum" in caplog.text
    assert len([k for b in dm.train_dataloader() for k in b["keys"]]) == 12


# ------------------------------------------------------------------------------------ 9. truncated safetensors
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "vq.safetensors"])
def test_a_truncated_tiny_backbone_file_is_named(tmp_path, random_backbone_dir, name):
    from hawkspec.backbones.tiny import TinyBackbone

    folder = Path(shutil.copytree(random_backbone_dir, tmp_path / "tiny"))
    truncate(folder / name)
    with pytest.raises(CorruptWeightsError) as err:
        TinyBackbone.from_pretrained(folder)
    msg = str(err.value)
    assert str(folder / name) in msg and "truncated" in msg and "tensor `" in msg and "make pretrain" in msg


def test_a_truncated_heads_file_is_named(tmp_path):
    from hawkspec.backbones.tiny import TinyBackbone
    from hawkspec.heads.draft import DraftHeads

    folder = Path(shutil.copytree(ASSETS / "heads" / "hawk", tmp_path / "hawk"))
    truncate(folder / "heads.safetensors")
    with pytest.raises(CorruptWeightsError) as err:
        DraftHeads.load(folder, TinyBackbone.from_pretrained(None))
    msg = str(err.value)
    assert str(folder / "heads.safetensors") in msg and "decoder.heads_path" in msg and "tensor `" in msg
    assert "make heads" in msg and "hawkspec-train" in msg


def test_a_truncated_evaluator_file_is_named(tmp_path):
    from hawkspec.metrics.evaluator import TinyEvaluator

    folder = Path(shutil.copytree(ASSETS / "evaluator", tmp_path / "evaluator"))
    truncate(folder / "evaluator.safetensors")
    with pytest.raises(CorruptWeightsError) as err:
        TinyEvaluator.load(folder, key="eval.quality.evaluator")
    msg = str(err.value)
    assert str(folder / "evaluator.safetensors") in msg and "eval.quality.evaluator" in msg
    assert "hawkspec-quality export_dir=" in msg


def test_a_truncated_backbone_fails_the_cli_naming_the_file(tmp_path, random_backbone_dir, capsys, monkeypatch):
    from hawkspec.cli.cache import main

    folder = Path(shutil.copytree(random_backbone_dir, tmp_path / "tiny"))
    truncate(folder / "model.safetensors")
    r = run_main(main, capsys, monkeypatch, f"backbone.path={folder}", f"cache.out_dir={tmp_path / 'shards'}",
                 f"hydra.run.dir={tmp_path / 'run'}", "cache.num_samples=4", "cache.val_samples=0")
    assert r.code == 1
    assert str(folder / "model.safetensors") in r.err and "tensor `" in r.err and "make pretrain" in r.err


def test_a_bad_header_entry_names_the_tensor(tmp_path):
    """A header whose byte range disagrees with one tensor's shape: the error names that tensor."""
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 12]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(12))
    assert "tensor `b`" in safetensors_problem(path)
    with pytest.raises(CorruptWeightsError, match=r"bad\.safetensors: tensor `b` \(F32\[2\], 8 bytes\).*Remake it"):
        load_safetensors(path, "test weights", "Remake it.")


def test_a_cache_planned_before_top_p_existed_is_still_the_same_plan(tmp_path):
    """Sampling keys added later (top_p, cfg_off_below_one) at their defaults leave the plan's fingerprint as it
    was, so a cache written before them resumes instead of being refused as "made with other settings"."""
    from hawkspec.cache.plan import CachePlan

    old = {"temperature": 1.0, "top_k": 128, "cfg_scale": 3.0}

    def plan(sampling):
        return CachePlan(out_dir=tmp_path / "train", split="train", num_samples=8, shard_size=4, batch_size=4,
                         seed=0, source="self", topk=0, sampling=sampling, identity={"name": "x"})

    assert plan(old).fingerprint() == plan({**old, "top_p": None, "cfg_off_below_one": False}).fingerprint()
    assert plan(old).fingerprint() != plan({**old, "top_p": 0.9}).fingerprint()
    plan(old).claim()  # a plan.json of the old shape, then a rerun with today's sampling keys
    plan({**old, "top_p": None, "cfg_off_below_one": False}).claim()
