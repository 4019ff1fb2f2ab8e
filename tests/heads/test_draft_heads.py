"""Draft heads: per-head targets (the classic off-by-one), zero-init identity, independent weights, save/load."""

import pytest
import torch

from hawkspec.backbones.base import ImageGrid
from hawkspec.heads.draft import DraftHeads, HeadsConfig, ResBlock
from hawkspec.heads.offsets import head_names, head_offsets, head_targets

GRID = ImageGrid(rows=4, cols=3, eol=True)  # W = 4, body length 16; forced at 3, 7, 11, 15


def stub_codes(grid: ImageGrid, batch: int = 2) -> torch.Tensor:
    """(B, rows*W) int16: the code at body position p is 10*p + b (b = row of the batch), -1 where forced."""
    p = torch.arange(grid.length)
    codes = 10 * p[None, :] + torch.arange(batch)[:, None]  # (B, L)
    return torch.where(grid.forced_mask()[None], torch.full_like(codes, -1), codes).to(torch.int16)


def test_offsets_are_medusa_and_hawk_targets():
    assert head_offsets(3, 2, tokens_per_row=4) == [2, 3, 4, 4, 8]  # h1 = s+2 (the LM head owns s+1)
    assert head_names(3, 2) == ["h1", "h2", "h3", "v1", "v2"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_horizontal_head_k_targets_the_code_at_s_plus_1_plus_k(k):
    codes = stub_codes(GRID)
    t = head_targets(codes, GRID, head_offsets(3, 0, GRID.tokens_per_row))  # (B, L+1, 3)
    assert t.dtype == torch.long and t.shape == (2, GRID.length + 1, 3)
    for b in range(2):
        for s in range(-1, GRID.length):
            p = s + 1 + k
            inside = 0 <= p < GRID.length
            want = 10 * p + b if inside and not GRID.is_forced(p) else -100
            assert t[b, s + 1, k - 1].item() == want, (b, s, k)
    # spot checks written out by hand: from the image-start token (s = -1) head 1 targets body position 1
    assert t[0, 0, 0].item() == 10 and t[1, 0, 0].item() == 11
    assert t[0, 2, 0].item() == -100  # s = 1: target 3 is the end-of-line token


@pytest.mark.parametrize("d", [1, 2, 3])
def test_vertical_head_d_targets_d_rows_below(d):
    codes = stub_codes(GRID)
    W = GRID.tokens_per_row
    t = head_targets(codes, GRID, head_offsets(1, 3, W))[..., 1:]  # vertical heads only: (B, L+1, 3)
    for s in range(-1, GRID.length):
        p = s + d * W
        want = 10 * p if 0 <= p < GRID.length and not GRID.is_forced(p) else -100
        assert t[0, s + 1, d - 1].item() == want, (s, d)
    assert t[0, 1 + 1, d - 1].item() == (10 * (1 + d * W) if d < 4 else -100)  # s = 1 -> same column, d rows down
    assert (t[0, GRID.length - W + 1 :, d - 1] == -100).all()  # sources in the last row point below the image


def test_zero_initialised_heads_predict_what_the_lm_head_predicts(random_backbone):
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2, num_layers=2), random_backbone)
    hidden = torch.randn(2, 5, random_backbone.hidden_size)
    logits = heads(hidden)  # (2, 5, H, K)
    lm = random_backbone.code_logits(hidden)  # (2, 5, K)
    assert logits.shape == (2, 5, 5, random_backbone.num_codes)
    for h in range(5):
        torch.testing.assert_close(logits[:, :, h], lm)


def test_every_head_and_layer_has_its_own_weights(random_backbone):
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=1, num_layers=2), random_backbone)
    linears = [m.linear for blk in heads.blocks for m in blk]
    assert len(linears) == 8 and len({id(m) for m in linears}) == 8
    assert len({m.weight.data_ptr() for m in linears}) == 8
    # train head 0 only: the others must not move
    opt = torch.optim.SGD(heads.parameters(), lr=1.0)
    x = torch.randn(4, random_backbone.hidden_size)
    target = torch.randint(0, random_backbone.num_codes, (4,))
    torch.nn.functional.cross_entropy(heads(x)[:, 0], target).backward()
    opt.step()
    assert heads.blocks[0][0].linear.weight.abs().sum() > 0
    for blk in heads.blocks[1:]:
        assert all(m.linear.weight.abs().sum() == 0 for m in blk)
    assert not any(p.requires_grad for p in heads.buffers())  # the LM head rows are frozen buffers


def test_resblock_is_identity_at_init():
    x = torch.randn(3, 8)
    torch.testing.assert_close(ResBlock(8)(x), x)


def test_save_load_round_trip_and_refuse_another_backbone(tmp_path, random_backbone, make_backbone):
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=2, vertical=True, vsd=1), random_backbone)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    heads.save(tmp_path)
    back = DraftHeads.load(tmp_path, random_backbone)
    x = torch.randn(2, random_backbone.hidden_size)
    torch.testing.assert_close(back(x), heads(x))
    with pytest.raises(ValueError, match="hidden_size"):
        DraftHeads.load(tmp_path, make_backbone(hidden_size=32))


@pytest.mark.parametrize(
    "config, rows, key",
    [
        (HeadsConfig(num_horizontal=0), None, "heads.num_horizontal"),
        (HeadsConfig(vertical=True, vsd=0), None, "heads.vsd"),
        (HeadsConfig(vertical=True, vsd=4), 4, "heads.vsd"),
        (HeadsConfig(num_layers=0), None, "heads.num_layers"),
    ],
)
def test_bad_head_configs_name_the_key(config, rows, key):
    with pytest.raises(ValueError, match=key):
        config.validate(rows)


def test_vsd_up_to_rows_minus_one_is_fine():
    HeadsConfig(vertical=True, vsd=3).validate(rows=4)
    HeadsConfig(vertical=False, vsd=0).validate(rows=4)  # Medusa


def test_loading_another_kind_of_drafter_names_the_key(tmp_path, random_backbone):
    import json

    from safetensors.torch import save_file

    (tmp_path / "heads.json").write_text(json.dumps({"kind": "eagle", "backbone": random_backbone.identity()}))
    save_file({"x": torch.zeros(1)}, tmp_path / "heads.safetensors")
    with pytest.raises(ValueError, match="decoder.heads_path"):
        DraftHeads.load(tmp_path, random_backbone)
