"""The static KV cache: allocated once at prefill and written by position; rows that accept different amounts
leave holes, which are closed (defragmented) when a block would not fit, without changing any hidden state."""

import torch

from hawkspec.decoding.build import seeded
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.acceptance import GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.proposers import MedusaProposer
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


def test_holes_are_defragmented_without_changing_hidden_states(random_backbone, prompts):
    """Row 0 keeps 3 nodes of every 4-node chain, row 1 only 1: with little spare room the cache must close row 1's
    holes; each row's next hidden state still equals a from-scratch recompute of what it kept."""
    bb = random_backbone
    enc = bb.encode(prompts)
    g = torch.Generator().manual_seed(0)
    state, _ = bb.prefill(enc, cfg=True, reserve=12)
    kept = [[], []]
    chain = torch.ones(4, 4, dtype=torch.bool).tril()
    for step in range(5):  # 5 x 3 slots > 12 reserved: forces at least one defragmentation
        nodes = bb.code_token_ids[torch.randint(0, bb.num_codes, (2, 4), generator=g)]
        bb.forward(state, nodes.repeat(2, 1), tree_mask=chain, depth=torch.arange(4))
        count = torch.tensor([3, 1])
        bb.compact(state, torch.arange(4).expand(4, -1), count.repeat(2), prefix=True)
        for b in range(2):
            kept[b] += nodes[b, : count[b]].tolist()
    nxt = bb.code_token_ids[torch.tensor([[1], [2]])]
    out = bb.forward(state, nxt.repeat(2, 1))[:, -1]
    for b in range(2):
        body = torch.tensor([kept[b] + [int(nxt[b])]])
        ref = bb.teacher_forced(enc.select([b]), body, cfg=True)[:, -1]
        torch.testing.assert_close(out[[b, 2 + b]], ref, atol=2e-4, rtol=1e-3)


def test_a_batch_whose_rows_accept_differently_decodes_like_each_row_alone(random_backbone, prompts):
    bb = random_backbone
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=False), bb)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    s = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    dec = SpeculativeDecoder(bb, MedusaProposer(heads), GreedyAcceptance(), s, paths_from_budget(6, 3, 2))
    both = dec.generate(prompts, seeded(0)).tokens
    for b, p in enumerate(prompts):
        assert torch.equal(both[b], ar_generate(bb, [p], s).tokens[0])
