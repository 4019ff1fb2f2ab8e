"""Non-finite numbers: refused where they enter (cache read, training loss, heads and checkpoints)."""

import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from hawkspec.cache.plan import file_digest
from hawkspec.data.manifest import MANIFEST
from hawkspec.data.shards import CorruptShardError, ShardDataModule
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.io import NonFiniteError, check_finite_state
from hawkspec.training.checkpoint import save_heads
from hawkspec.training.heads import HeadTrainingModule


def poison_shard(folder, index=0, sample=1):
    """Rewrite shard ``index`` with one NaN in the hidden state of its ``sample``-th sample (manifest updated so
    that only the values are wrong, as when a broken model wrote them)."""
    path = folder / f"shard-{index:06d}.tar"
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    arr = np.load(io.BytesIO(samples[sample]["hidden.npy"]))
    arr[3, 0] = np.nan
    buf = io.BytesIO()
    np.save(buf, arr)
    samples[sample]["hidden.npy"] = buf.getvalue()
    with open(path, "wb") as f:
        w = wds.TarWriter(f)
        for s in samples:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
        w.close()
    raw = json.loads((folder / MANIFEST).read_text())
    raw["shards"][index]["bytes"], raw["shards"][index]["sha256"] = file_digest(path)
    (folder / MANIFEST).write_text(json.dumps(raw))
    return samples[sample]["__key__"]


def test_a_nan_in_a_shard_is_named_when_read(tmp_path, tiny_cache, random_backbone):
    """Expect: CorruptShardError naming the sample and the shard (not a NaN loss much later)."""
    folder = tmp_path / "train"
    shutil.copytree(f"{tiny_cache}/train", folder)
    key = poison_shard(folder)
    dm = ShardDataModule(str(folder), batch_size=4, resampled=False, num_workers=0, identity=random_backbone.identity())
    with pytest.raises(CorruptShardError, match=rf"{key} in shard .*shard-000000\.tar holds NaN or Inf"):
        list(dm.train_dataloader())


def heads_module(backbone):
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=2, vertical=True, vsd=1), backbone)
    return HeadTrainingModule(heads, backbone.grid, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_a_non_finite_loss_stops_training_naming_step_shard_and_sample(random_backbone):
    """Expect: NonFiniteError naming the step, the shard and the sample whose inputs are NaN."""
    module = heads_module(random_backbone)
    S = random_backbone.grid.rows * (random_backbone.grid.cols + int(random_backbone.grid.eol)) + 1
    hidden = torch.zeros(2, S, random_backbone.hidden_size)
    hidden[1, 4, 0] = float("nan")
    codes = torch.zeros(2, S - 1, dtype=torch.int16)
    batch = {"hidden": hidden, "codes": codes, "keys": ["s000000000", "s000000001"], "shards": ["/c/shard-000003.tar"]}
    with pytest.raises(NonFiniteError, match=r"step 0 .*shard-000003\.tar.*s000000001"):
        module.training_step(batch, 0)


def test_heads_with_non_finite_weights_are_neither_saved_nor_loaded(tmp_path, random_backbone):
    """Expect: save_heads raises and writes nothing; DraftHeads.load and a Lightning resume refuse NaN weights."""
    module = heads_module(random_backbone)
    trainer = SimpleNamespace(global_step=5, current_epoch=0, callback_metrics={})
    with torch.no_grad():
        next(module.heads.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="step 5"):
        save_heads(module.heads, trainer, tmp_path / "heads")
    assert not (tmp_path / "heads").exists()
    with pytest.raises(NonFiniteError, match="checkpoint not written"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    with pytest.raises(NonFiniteError, match="resume"):
        module.on_load_checkpoint({"state_dict": module.state_dict()})
    module.heads.save(tmp_path / "raw")  # written around the guard, as a broken tool might
    with pytest.raises(NonFiniteError, match="raw"):
        DraftHeads.load(tmp_path / "raw", random_backbone)


def test_check_finite_state_names_every_bad_tensor():
    state = {"a": torch.ones(2), "b": torch.tensor([float("nan")]), "c": torch.arange(3)}
    with pytest.raises(NonFiniteError, match=r"\['b'\]"):
        check_finite_state(state, "x")
