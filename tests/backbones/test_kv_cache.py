"""The static KV cache: allocated once at prefill and written by position; each row writes its blocks right after
its own committed tokens, so rows that accept different amounts leave no holes and need no defragmentation."""

import pytest
import torch

from hawkspec.decoding.build import seeded
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.acceptance import GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.draft import DraftHeads, HeadsConfig


def test_the_cache_is_allocated_once(random_backbone, prompts):
    bb = random_backbone
    state, _ = bb.prefill(bb.encode(prompts), cfg=True, reserve=bb.grid.length)
    ptrs = [layer.keys.data_ptr() for layer in state.cache.layers]
    ar_ids = bb.body_ids(torch.zeros(len(prompts), bb.grid.rows, bb.grid.cols, dtype=torch.long))
    for j in range(bb.grid.length):
        bb.forward(state, ar_ids[:, j : j + 1].repeat(2, 1))
    assert [layer.keys.data_ptr() for layer in state.cache.layers] == ptrs
    assert state.used == state.capacity  # prompt + body: exactly what was reserved


def test_rows_that_accept_differently_stay_contiguous_and_exact(random_backbone, prompts):
    """Row 0 keeps 3 nodes of every 4-node chain, row 1 only 1, in a cache reserved for row 0's tokens and one block
    exactly: each row's tokens stay contiguous after its prompt (no holes), and each row's next hidden state equals
    a from-scratch recompute of what it kept."""
    bb = random_backbone
    enc = bb.encode(prompts)
    g = torch.Generator().manual_seed(0)
    state, _ = bb.prefill(enc, cfg=True, reserve=5 * 3 + 4)
    P = state.capacity - (5 * 3 + 4)
    kept = [[], []]
    for step in range(5):
        nodes = bb.code_token_ids[torch.randint(0, bb.num_codes, (2, 4), generator=g)]
        tree = torch.ones(4, 4, dtype=torch.bool).tril() if step % 2 else None
        if tree is None:  # a real tree: node 2 is a sibling of node 1, node 3 its child
            tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
            depth, keep = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 2, 3, 1])
        else:
            depth, keep = torch.arange(4), torch.arange(4)
        bb.forward(state, nodes.repeat(2, 1), tree_mask=tree, depth=depth)
        count = torch.tensor([3, 1])
        bb.compact(state, keep.expand(4, -1), count.repeat(2), prefix=step % 2 == 1)
        for b in range(2):
            kept[b] += nodes[b, keep[: count[b]]].tolist()
    assert state.ptr.tolist() == [P + 15, P + 5] * 2
    slot = torch.arange(state.capacity)
    assert torch.equal(state.key_mask[:, P:], (slot[P:] < state.ptr[:, None]))  # contiguous, nothing past ptr
    nxt = bb.code_token_ids[torch.tensor([[1], [2]])]
    out = bb.forward(state, nxt.repeat(2, 1))[:, -1]
    for b in range(2):
        body = torch.tensor([kept[b] + [int(nxt[b])]])
        ref = bb.teacher_forced(enc.select([b]), body, cfg=True)[:, -1]
        torch.testing.assert_close(out[[b, 2 + b]], ref, atol=2e-4, rtol=1e-3)


def test_a_block_that_does_not_fit_is_refused(random_backbone, prompts):
    bb = random_backbone
    state, _ = bb.prefill(bb.encode(prompts), cfg=False, reserve=3)
    bb.forward(state, bb.code_token_ids[:2].expand(2, -1))
    with pytest.raises(RuntimeError, match="reserve"):
        bb.forward(state, bb.code_token_ids[:2].expand(2, -1))


def test_a_batch_whose_rows_accept_differently_decodes_like_each_row_alone(random_backbone, prompts):
    bb = random_backbone
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=False), bb)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    s = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    medusa = proposer_from_config("medusa", {"horizontal": heads})
    dec = SpeculativeDecoder(bb, medusa, GreedyAcceptance(), s, paths_from_budget(6, 3, 2))
    both = dec.generate(prompts, seeded(0)).tokens
    for b, p in enumerate(prompts):
        assert torch.equal(both[b], ar_generate(bb, [p], s).tokens[0])
