"""EAGLE training: the loss rows line up with the cache (a perfect drafter scores zero), it learns, and the
pipeline runs end to end (cache -> train -> checkpoint -> decode), in-process and through ``hawkspec-train``."""

import json
from functools import partial

import lightning as L
import pytest
import torch

from hawkspec.data.shards import ShardDataModule
from hawkspec.decoding.acceptance import GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import EagleProposer
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.eagle import EagleDrafter
from hawkspec.training.checkpoint import VAL_METRICS, HeadsCheckpoint
from hawkspec.training.eagle import EagleTrainingModule


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    return L.Trainer(**{**args, **kw})


def datamodule(cache, backbone) -> ShardDataModule:
    return ShardDataModule(f"{cache}/train", f"{cache}/val", batch_size=4, num_workers=0,
                           identity=backbone.identity(), resampled=True, samples_per_epoch=12)


def module(backbone, **kw) -> EagleTrainingModule:
    return EagleTrainingModule.for_backbone(backbone, partial(torch.optim.AdamW, lr=3e-3), **kw)


class Perfect(EagleTrainingModule):
    """A drafter that returns the true next feature: both losses must be (near) zero, so every row of the
    loss reads the right cached state and the right code."""

    def _step(self, batch, stage):
        self.heads.forward = lambda hidden, codes, noise=0.0, generator=None: hidden[:, 1:].float()  # noqa: E731
        return super()._step(batch, stage)


@pytest.mark.parametrize("spatial", [False, True])
def test_loss_is_zero_for_the_true_features_and_positive_for_a_fresh_drafter(random_backbone, tiny_cache, spatial):
    dm = datamodule(tiny_cache, random_backbone)
    batch = next(iter(dm.val_dataloader()))
    fresh = module(random_backbone, spatial=spatial)
    perfect = Perfect.for_backbone(random_backbone, partial(torch.optim.AdamW, lr=0.0), spatial=spatial)
    for m in (fresh, perfect):
        m.log = lambda *a, **k: None
    with torch.no_grad():
        f = perfect._step(batch, "val")
    # soft CE of the target with itself is the target's entropy: zero feature loss, token loss = entropy
    m = perfect.heads.code_head
    h = batch["hidden"].float()[:, 1:]
    p = torch.softmax(m(h), -1)
    nxt = torch.cat([batch["codes"].long()[:, 1:], batch["codes"].new_full((h.shape[0], 1), -1).long()], 1)
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)[nxt >= 0].mean()
    assert abs(float(f) - 0.1 * float(ent)) < 1e-4
    assert fresh._step(batch, "val") > f + 1e-3


def test_bad_loss_settings_name_the_key(random_backbone):
    with pytest.raises(ValueError, match="heads.token_loss"):
        module(random_backbone, token_loss="kl")
    with pytest.raises(ValueError, match="heads.noise"):
        module(random_backbone, noise=-1.0)


@pytest.mark.slow  # 15-45 s on 2 shared cores
def test_train_checkpoint_and_decode_in_process(random_backbone, tiny_cache, tmp_path):
    """Cache -> a few training steps -> the heads' checkpoint callback saves the drafter (with val metrics) ->
    it loads for the backbone and decodes greedily like AR."""
    dm = datamodule(tiny_cache, random_backbone)
    m = module(random_backbone, spatial=True)
    ckpt = HeadsCheckpoint(tmp_path / "eagle")
    t = trainer(max_steps=6, callbacks=[ckpt], val_check_interval=3, check_val_every_n_epoch=None,
                limit_val_batches=1)
    batch = next(iter(dm.val_dataloader()))
    m.log = lambda *a, **k: None
    with torch.no_grad():
        before = float(m._step(batch, "val"))
    del m.log
    t.fit(m, datamodule=dm)
    m.log = lambda *a, **k: None
    with torch.no_grad():
        assert float(m._step(batch, "val")) < before  # it learns
    report = json.loads((tmp_path / "eagle" / VAL_METRICS).read_text())
    assert report["heads"][0]["name"] == "h1" and report["config"]["spatial"] is True
    drafter = EagleDrafter.load(tmp_path / "eagle", random_backbone)
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=3.0)
    prompts = ["a red circle", "a blue square"]
    dec = SpeculativeDecoder(random_backbone, EagleProposer(drafter=drafter), GreedyAcceptance(), s,
                             paths_from_budget(8, 4, 3))
    assert torch.equal(dec.generate(prompts).codes, ar_generate(random_backbone, prompts, s).codes)


@pytest.mark.slow
def test_hawkspec_train_heads_eagle_then_eval(tmp_path, random_backbone_dir):
    """``hawkspec-cache`` -> ``hawkspec-train heads=eagle_spatial`` exports a drafter that ``decoder=eagle_spatial``
    decodes with in ``hawkspec-eval``."""
    from hawkspec.backbones.tiny import TinyBackbone
    from hawkspec.testing import run_cli

    run_cli("hawkspec-cache", f"backbone.path={random_backbone_dir}", f"hydra.run.dir={tmp_path / 'cache'}",
            "cache.num_samples=8", "cache.val_samples=4", "cache.shard_size=4", "cache.batch_size=4",
            "sampling.top_k=32")
    shards = tmp_path / "cache" / "shards"
    export = tmp_path / "heads" / "eagle_spatial"
    run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={shards}", "heads=eagle_spatial",
            f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=2", "data.batch_size=4", "logger=csv",
            f"export_dir={export}")
    report = json.loads((export / VAL_METRICS).read_text())
    assert report["global_step"] == 2 and report["config"]["spatial"] is True
    bb = TinyBackbone.from_pretrained(random_backbone_dir)
    assert EagleDrafter.load(export, bb).config.spatial
    run_cli("hawkspec-eval", f"backbone.path={random_backbone_dir}", f"paths.heads_dir={tmp_path / 'heads'}",
            "decoder=eagle_spatial", "eval.decoders=[ar,eagle_spatial]", "eval.num_prompts=2",
            "eval.batch_size=2", "eval.repeats=1", "eval.warmup_batches=0", "eval.grid_images=2",
            "eval.quality.enabled=false", f"hydra.run.dir={tmp_path / 'eval'}")
    assert "eagle_spatial" in (tmp_path / "eval" / "results.md").read_text()
