import pytest
import torch

from hawkspec.backbones.base import ImageGrid
from hawkspec.backbones.tiny import EOL, IMAGE_END, IMAGE_START, TinyBackbone


def test_grid_layout():
    g = ImageGrid(rows=3, cols=4)
    assert g.tokens_per_row == 5 and g.length == 15 and g.num_codes == 12
    assert g.forced_mask().nonzero().squeeze(1).tolist() == [4, 9, 14]
    assert g.code_positions().tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13]
    assert ImageGrid(3, 4, eol=False).forced_mask().sum() == 0


def test_image_sequence_layout(random_backbone):
    layout = random_backbone.layout
    codes = torch.arange(16).view(1, 4, 4)
    seq = layout.image_sequence(codes)[0]
    assert seq[0] == IMAGE_START and seq[-1] == IMAGE_END
    body = seq[1:-1].view(4, 5)
    assert (body[:, 4] == EOL).all()
    assert torch.equal(body[:, :4] - layout.code_offset, codes[0])


def test_tree_forward_matches_linear_forward_and_compaction(random_backbone, prompts):
    bb = random_backbone
    ids = bb.encode(prompts)
    gen = torch.Generator().manual_seed(0)
    path = torch.randint(0, bb.num_codes, (2, 3), generator=gen) + bb.layout.code_offset
    other = torch.randint(0, bb.num_codes, (2, 1), generator=gen) + bb.layout.code_offset

    linear_state, _ = bb.prefill(ids, cfg=True)
    linear = bb.forward(linear_state, path.repeat(2, 1))

    tree_state, _ = bb.prefill(ids, cfg=True)
    # node 0 = path[0]; node 1 = path[1] (child of 0); node 2 = other (child of 0); node 3 = path[2] (child of 1)
    tree_ids = torch.cat([path[:, :2], other, path[:, 2:]], dim=1).repeat(2, 1)
    tree_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    tree = bb.forward(tree_state, tree_ids, tree_mask=tree_mask, depth=torch.tensor([0, 1, 1, 2]))
    torch.testing.assert_close(tree[:, [0, 1, 3]], linear, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="compact"):
        bb.forward(tree_state, tree_ids[:, :1])

    # rows accept different lengths: row 0 keeps the whole path, the others only node 0
    keep = torch.tensor([[0, 1, 3]] * 4)
    count = torch.tensor([3, 1, 3, 1])
    bb.compact(tree_state, keep, count)
    assert tree_state.next_pos.tolist() == (linear_state.next_pos - 3 + count).tolist()
    nxt = torch.full((4, 1), bb.layout.code_offset + 5)
    after_tree = bb.forward(tree_state, nxt)
    after_linear = bb.forward(linear_state, nxt)
    torch.testing.assert_close(after_tree[[0, 2]], after_linear[[0, 2]], atol=1e-5, rtol=1e-4)
    # row 1 kept only node 0: equal to a fresh linear run of path[:1] then nxt
    ref_state, _ = bb.prefill(ids, cfg=True)
    bb.forward(ref_state, path[:, :1].repeat(2, 1))
    ref = bb.forward(ref_state, nxt)
    torch.testing.assert_close(after_tree[[1, 3]], ref[[1, 3]], atol=1e-5, rtol=1e-4)


def test_prefix_compaction_of_a_chain_equals_the_gathering_one(random_backbone, prompts):
    """compact(prefix=True) skips the KV gather for chain blocks; the next forward must not notice."""
    bb = random_backbone
    ids = bb.encode(prompts)
    chain = torch.randint(0, bb.num_codes, (2, 4), generator=torch.Generator().manual_seed(1)) + bb.layout.code_offset
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    keep = torch.tensor([[0, 1, 2, 0]] * 4)  # padding past count is arbitrary
    count = torch.tensor([3, 1, 3, 1])
    nxt = torch.full((4, 1), bb.layout.code_offset + 7)
    outs = []
    for prefix in (False, True):
        state, _ = bb.prefill(ids, cfg=True)
        bb.forward(state, chain.repeat(2, 1), tree_mask=mask, depth=torch.arange(4))
        bb.compact(state, keep, count, prefix=prefix)
        outs.append((bb.forward(state, nxt), state.next_pos.clone(), state.key_mask.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])


def test_prefill_streams_and_hidden(random_backbone, prompts):
    state, hidden = random_backbone.prefill(random_backbone.encode(prompts), cfg=True)
    assert state.streams == 2 and state.batch_size == 2
    assert hidden.shape == (4, random_backbone.hidden_size)
    assert random_backbone.code_logits(hidden).shape == (4, random_backbone.num_codes)


def test_prompt_longer_than_context_is_an_error(random_backbone):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        random_backbone.prefill(random_backbone.encode(["red " * 100]), cfg=False)


def test_unknown_words_map_to_unk(random_backbone, caplog):
    ids = random_backbone.encode(["a zebra"]).cond[0]
    assert ids[-1] == 2  # <unk>
    assert "zebra" in caplog.text


def test_save_load_roundtrip(random_backbone_dir, random_backbone):
    loaded = TinyBackbone.from_pretrained(random_backbone_dir)
    assert loaded.identity()["grid"] == random_backbone.identity()["grid"]
    torch.testing.assert_close(loaded.code_embeddings(), random_backbone.code_embeddings())
    assert loaded.revision == TinyBackbone.from_pretrained(random_backbone_dir).revision


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        TinyBackbone.from_pretrained(tmp_path / "nope")


def test_shipped_weights_load():
    bb = TinyBackbone.from_pretrained()
    assert bb.num_codes >= 512
    assert bb.grid.rows >= 8 and bb.grid.eol
