"""Head training: loss weights, distillation rows, metric wiring with always/never-right stub heads."""

import json
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from hawkspec.backbones.base import ImageGrid
from hawkspec.cache.teacher import body_codes, teacher_forced_states
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.heads.offsets import head_targets
from hawkspec.training.checkpoint import VAL_METRICS, HeadsCheckpoint
from hawkspec.training.heads import HeadTrainingModule, distill_kl, head_loss_weights, teacher_rows

GRID = ImageGrid(rows=4, cols=4, eol=True)  # the random backbone's grid: W = 5, body length 20


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    return L.Trainer(**{**args, **kw})


def module(backbone, config=HeadsConfig(num_horizontal=3, vertical=True, vsd=2), **kw) -> HeadTrainingModule:
    heads = DraftHeads.for_backbone(config, backbone)
    return HeadTrainingModule(heads, backbone.grid, optimizer=partial(torch.optim.AdamW, lr=1e-2), **kw)


def test_loss_weights_decay_per_head():
    assert head_loss_weights(3, 2, decay=0.5, vertical_weight=2.0) == [1.0, 0.5, 0.25, 2.0, 1.0]
    assert head_loss_weights(2, 0, decay=0.8, vertical_weight=1.0) == [1.0, 0.8]


def test_teacher_rows_are_the_base_distribution_of_each_head_target(random_backbone, prompts):
    """With greedy sampling the cached top-1 at a row *is* the code the sequence has there, so the teacher row
    of every head must hold exactly that head's target (the off-by-one a distillation loss can get wrong)."""
    greedy = SamplingConfig(temperature=0, top_k=None, cfg_scale=1.0)
    codes = ar_generate(random_backbone, prompts, greedy).codes
    _, _, idx = teacher_forced_states(random_backbone, prompts, codes, greedy, topk=1)  # (B, S, 1)
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=4, vertical=True, vsd=3), random_backbone)
    targets = head_targets(body_codes(GRID, codes), GRID, heads.offsets)  # (B, S, H)
    S = GRID.length + 1
    for h, offset in enumerate(heads.offsets):
        valid = targets[..., h] >= 0
        assert torch.equal(idx[:, teacher_rows(S, offset), 0][valid], targets[..., h][valid]), heads.names[h]
        # one row off is wrong
        assert not torch.equal(idx[:, teacher_rows(S, offset + 1), 0][valid], targets[..., h][valid])


def test_distill_kl_is_zero_for_the_teacher_and_positive_otherwise():
    probs = torch.tensor([[0.6, 0.3]])
    idx = torch.tensor([[2, 0]])
    logits = torch.full((1, 4), -1e4)
    logits[0, 2], logits[0, 0] = torch.log(torch.tensor(2 / 3)), torch.log(torch.tensor(1 / 3))
    assert distill_kl(logits, probs, idx).abs() < 1e-5
    assert distill_kl(torch.zeros(1, 4), probs, idx) > 0.1


class StubHeads(HeadTrainingModule):
    """Heads whose answers are known: ``shift=0`` always names the true target code, ``shift=1`` names the code
    one position later (the classic off-by-one). Hidden state channel 0 carries the flat (b, row) index."""

    def __init__(self, backbone, codes, shift):
        super().__init__(DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), backbone),
                         backbone.grid, optimizer=partial(torch.optim.SGD, lr=0.0))
        self.codes, self.shift, self.K = codes, shift, backbone.num_codes

    def head_logits(self, h, x):
        flat = x[:, 0].round().long()  # (N,)
        shifted = [o + self.shift for o in self.offsets]
        answer = head_targets(self.codes, self.grid, shifted)[..., h].reshape(-1)[flat]  # (N,)
        return torch.nn.functional.one_hot(answer.clamp(min=0), self.K).float() * 10


def stub_batch(random_backbone):
    B, S = 2, GRID.length + 1
    p = torch.arange(GRID.length)
    codes = torch.where(GRID.forced_mask()[None], -1, 10 * p[None] + torch.arange(B)[:, None])  # distinct codes
    hidden = torch.zeros(B, S, random_backbone.hidden_size)
    hidden[..., 0] = torch.arange(B * S, dtype=torch.float).view(B, S)
    return codes, {"hidden": hidden.half(), "codes": codes.to(torch.int16), "keys": ["a", "b"]}


@pytest.mark.parametrize("shift, top1", [(0, 1.0), (1, 0.0)])
def test_validation_metrics_score_known_answers(random_backbone, shift, top1):
    codes, batch = stub_batch(random_backbone)
    stub = StubHeads(random_backbone, codes, shift)
    metrics = trainer().validate(stub, DataLoader([batch], batch_size=None, collate_fn=lambda b: b), verbose=False)[0]
    for name in ("h1", "h2", "h3", "v1", "v2"):
        assert metrics[f"val/head_{name}_top1"] == pytest.approx(top1), name
        assert f"val/head_{name}_top5" in metrics


def test_training_lowers_the_loss_and_saves_the_heads(tmp_path, random_backbone, tiny_cache):
    from hawkspec.data.shards import ShardDataModule

    dm = ShardDataModule(f"{tiny_cache}/train", f"{tiny_cache}/val", batch_size=4, num_workers=0,
                         identity=random_backbone.identity(), topk=True, resampled=True, samples_per_epoch=12)
    m = module(random_backbone, distill_weight=0.5)
    batch = next(iter(dm.val_dataloader()))

    def val_loss():
        with torch.no_grad():
            hidden, t = batch["hidden"].float(), head_targets(batch["codes"], GRID, m.offsets)
            logits = m.heads(hidden)  # (B, S, H, K)
            return sum(torch.nn.functional.cross_entropy(logits[..., h, :][t[..., h] >= 0], t[..., h][t[..., h] >= 0])
                       for h in range(len(m.offsets)))

    before = val_loss()
    ckpt = HeadsCheckpoint(tmp_path / "heads", export_dir=tmp_path / "export")
    t = trainer(max_epochs=10, callbacks=[ckpt], check_val_every_n_epoch=5)
    t.fit(m, datamodule=dm)
    assert t.global_step == 30 and val_loss() < before - 0.5
    report = json.loads((tmp_path / "export" / VAL_METRICS).read_text())
    assert report["global_step"] == 30 and [r["name"] for r in report["heads"]] == ["h1", "h2", "h3", "v1", "v2"]
    assert report["heads"][3] == {**report["heads"][3], "offset": 5, "rows": 1, "cols": 0}
    assert 0 <= report["metrics"]["val/head_v2_top5"] <= 1 and "val/kl_h1" in report["metrics"]
    back = DraftHeads.load(tmp_path / "export", random_backbone)
    x = torch.randn(3, random_backbone.hidden_size)
    torch.testing.assert_close(back(x), m.heads(x))


@pytest.mark.parametrize("kw, key", [({"distill_weight": 1.5}, "loss.distill_weight"), ({"decay": 0.0}, "loss.decay"),
                                     ({"vertical_weight": -1.0}, "loss.vertical_weight")])
def test_bad_loss_settings_name_the_key(random_backbone, kw, key):
    with pytest.raises(ValueError, match=key):
        module(random_backbone, **kw)
