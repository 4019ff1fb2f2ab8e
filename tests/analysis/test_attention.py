"""Attention by spatial offset: stub backbones whose attention is known by construction give the expected maps
and shares; a real adapter's maps reduce to shares that sum to one."""

import math

import pytest
import torch

from hawkspec.analysis.attention import attention_by_offset, offset_attention
from hawkspec.backbones.base import ImageGrid, PromptBatch

GRID = ImageGrid(rows=4, cols=5, eol=True)  # W = 6, L = 24
PROMPT, START = 3, 2  # prompt slots (incl. padding), image-start slots


def one_hot_attention(grid, key_of, layers=2, batch=2, heads=3, prompt=PROMPT, start=START):
    """(layers, B, heads, L, S) attention where body query j puts all its mass on slot ``key_of(j)`` (an index
    into the S slots)."""
    L = grid.length
    S = prompt + start + L
    a = torch.zeros(layers, batch, heads, L, S)
    for j in range(L):
        a[..., j, key_of(j)] = 1.0
    return a


def body_slot(k):
    return PROMPT + START + k


def test_attention_to_the_token_above_the_next_one():
    W, L = GRID.tokens_per_row, GRID.length
    # every query looks at the key right above the token it predicts, where there is one; else at the bos slot
    a = one_hot_attention(GRID, lambda j: body_slot(j + 1 - W) if j + 1 - W >= 0 else 0)
    res = attention_by_offset(a, GRID, START, anchor="next")
    assert res.at(-1, 0) == pytest.approx(1.0)
    m = res.mean.clone()
    m[GRID.rows - 2, GRID.cols - 1] = 0.0
    assert torch.nan_to_num(m).abs().max() == 0  # nothing anywhere else
    assert math.isnan(res.at(0, 0)) and math.isnan(res.at(0, 2))  # not written yet
    # queries: positions whose next token is a code (the last body token and the ones before an eol are out)
    valid = [j for j in range(L) if j + 1 < L and (j + 1) % W != GRID.cols]
    above = [j for j in valid if j + 1 - W >= 0]
    assert res.queries == 2 * len(valid) and res.images == 2
    assert res.shares["rows_above"] == pytest.approx(len(above) / len(valid))
    assert res.shares["prompt"] == pytest.approx(1 - len(above) / len(valid))
    assert sum(res.shares.values()) == pytest.approx(1.0)
    prof = res.row_profile()
    assert prof["above"] == pytest.approx(1.0) and prof["left"] == 0.0


def test_attention_to_the_previous_token_and_to_itself():
    W = GRID.tokens_per_row
    prev = one_hot_attention(GRID, lambda j: body_slot(j))  # query j reads token j = the one left of j + 1
    res = attention_by_offset(prev, GRID, START, anchor="next")
    assert res.at(0, -1) == pytest.approx(1.0)
    # at the first column the previous token is an end-of-line token: reported as eol, off the map
    valid = [j for j in range(GRID.length - 1) if (j + 1) % W != GRID.cols]
    eol = [j for j in valid if j % W == GRID.cols]
    assert res.shares["eol"] == pytest.approx(len(eol) / len(valid))
    assert res.shares["same_row"] == pytest.approx(1 - len(eol) / len(valid))
    own = attention_by_offset(prev, GRID, START, anchor="query")
    assert own.at(0, 0) == pytest.approx(1.0) and own.shares["same_row"] == pytest.approx(1.0)


def test_uniform_attention_shares_count_the_visible_slots():
    L, W = GRID.length, GRID.tokens_per_row
    S = PROMPT + START + L
    a = torch.zeros(1, 1, 1, L, S)
    for j in range(L):
        a[..., j, : PROMPT + START + j + 1] = 1.0 / (PROMPT + START + j + 1)
    res = attention_by_offset(a, GRID, START, anchor="next")
    valid = [j for j in range(L - 1) if (j + 1) % W != GRID.cols]
    expect = sum(PROMPT / (PROMPT + START + j + 1) for j in valid) / len(valid)
    assert res.shares["prompt"] == pytest.approx(expect)
    assert sum(res.shares.values()) == pytest.approx(1.0)
    # the (0, -1) key of query j weighs 1 / (slots visible to j), averaged over the queries that have one
    js = [j for j in valid if (j + 1) % W >= 1]
    assert res.at(0, -1) == pytest.approx(sum(1 / (PROMPT + START + j + 1) for j in js) / len(js))


def test_batches_add_up_and_bad_shapes_are_refused():
    a = one_hot_attention(GRID, lambda j: body_slot(j), batch=1)
    one = attention_by_offset(a, GRID, START)
    two = one + one
    assert two.images == 2 and torch.allclose(torch.nan_to_num(two.mean), torch.nan_to_num(one.mean))
    with pytest.raises(ValueError, match="body queries"):
        attention_by_offset(a[..., :-1, :], GRID, START)
    with pytest.raises(ValueError, match="anchor"):
        attention_by_offset(a, GRID, START, anchor="target")
    sub, drs, dcs = one.window(1, 2)
    assert sub.shape == (2, 5) and drs == [-1, 0] and dcs == [-2, -1, 0, 1, 2]


class StubBackbone:
    """Just the interface the analysis uses: the attention is the 'token above the next one' pattern."""

    grid = GRID
    image_start_ids = [7, 8]
    code_token_ids = torch.arange(100, 120)
    eol_token_id = 9

    def encode(self, prompts):
        return PromptBatch([[1] * (1 + i) for i in range(len(prompts))], [[1]] * len(prompts))

    def body_ids(self, codes):
        from hawkspec.backbones.base import Backbone

        return Backbone.body_ids(self, codes)

    def attention_maps(self, prompts, body):
        B, L = body.shape
        longest = max(len(p) for p in prompts.cond)
        W = self.grid.tokens_per_row
        S = longest + len(self.image_start_ids) + L
        a = torch.zeros(2, B, 2, L, S)
        for j in range(L):
            a[..., j, S - L + j + 1 - W if j + 1 - W >= 0 else S - L - 1] = 1.0  # else: the last image-start slot
        return a


def test_offset_attention_through_the_interface():
    bb = StubBackbone()
    codes = torch.zeros(3, GRID.rows, GRID.cols, dtype=torch.long)
    res = offset_attention(bb, ["a", "b", "c"], codes=codes, batch_size=2)
    assert res.images == 3
    assert res.at(-1, 0) == pytest.approx(1.0)
    assert res.shares["prompt"] == 0.0 and res.shares["image_start"] > 0


def test_a_real_adapter(random_backbone, prompts):
    res = offset_attention(random_backbone, prompts, batch_size=1)
    assert res.images == len(prompts)
    assert sum(res.shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(res.mean[:-1]).all()  # every row above has keys at every offset
    assert (res.per_layer.shape[0], *res.mean.shape) == (
        random_backbone.transformer.config.num_hidden_layers, random_backbone.grid.rows,
        2 * random_backbone.grid.cols - 1)
