"""EAGLE-2's dynamic tree (``decoder.tree.dynamic``): each row forwards only the N nodes of the superset tree with
the highest cumulative draft probability. The selection is prefix-closed, the forward really shrinks, greedy
decoding still equals AR and the exact rule stays lossless."""

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import JacobiProposer
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import ancestor_mask, paths_from_budget, select_subtree
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.testing import peaky, random_backbone
from hawkspec.testing import ExactByTries

PROMPTS = ["a large red circle in the center", "a small blue square on the left"]


def test_selection_keeps_the_most_probable_prefix_closed_nodes():
    # 0 root; 1, 2 children of 0; 3 child of 1; 4 child of 3 (forced: free); 5 child of 2
    parent = torch.tensor([[-1, 0, 0, 1, 3, 2]])
    anc = ancestor_mask(parent)
    lp = torch.tensor([[0.0, -0.1, -2.0, -0.5, 0.0, -0.01]])  # cumulative: 0, -.1, -2, -.6, -.6, -2.01
    ok = torch.ones(1, 6, dtype=torch.bool)
    assert select_subtree(lp, ok, anc, 4).tolist() == [[0, 1, 3, 4]]
    assert select_subtree(lp, ok, anc, 5).tolist() == [[0, 1, 2, 3, 4]]
    ok[0, 1] = False  # no candidate at node 1: its subtree cannot be kept before every usable node
    assert select_subtree(lp, ok, anc, 3).tolist() == [[0, 2, 5]]


def _medusa(bb, seed=0, scale=0.05):
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=4, vertical=False), bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return heads


def medusa(heads, **keys):
    """``conf/decoder/proposer/medusa.yaml`` with ``heads`` (``keys``: its config keys, dots as ``__``)."""
    return proposer_from_config("medusa", {"horizontal": heads}, **keys)


def test_dynamic_tree_forwards_fewer_nodes_and_equals_greedy_ar():
    bb = random_backbone("tiny", rows=3, cols=4, num_codes=32)
    s = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    paths = paths_from_budget(16, 4, 3)
    dec = SpeculativeDecoder(bb, medusa(_medusa(bb)), GreedyAcceptance(), s, paths, dynamic_nodes=6)
    seen = []
    forward = bb.forward
    bb.forward = lambda state, ids, **kw: seen.append(ids.shape[1]) or forward(state, ids, **kw)
    try:
        out = dec.generate(PROMPTS, torch.Generator().manual_seed(0))
    finally:
        del bb.forward
    assert set(seen) == {6} and dec.table.num_nodes > 6
    assert torch.equal(out.tokens, ar_generate(bb, PROMPTS, s).tokens)


def test_dynamic_tree_needs_scored_drafts_and_a_sane_size():
    bb = random_backbone("tiny", rows=3, cols=4, num_codes=32)
    s = SamplingConfig(temperature=1.0, top_k=0, cfg_scale=1.0)
    dec = SpeculativeDecoder(bb, JacobiProposer(), ExactAcceptance(), s, paths_from_budget(8, 8, 1), dynamic_nodes=4)
    with pytest.raises(ValueError, match="decoder.tree.dynamic"):
        dec.generate(PROMPTS[:1], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="decoder.tree.dynamic"):
        SpeculativeDecoder(bb, medusa(_medusa(bb)), ExactAcceptance(), s, paths_from_budget(4, 2, 2),
                           dynamic_nodes=100)


@pytest.mark.parametrize("rule", [ExactAcceptance, ExactByTries])
def test_dynamic_tree_is_lossless_with_the_exact_rule(rule):
    from hawkspec.metrics.lossless import chi_square, image_distribution

    bb = peaky(random_backbone("tiny", rows=2, cols=3, num_codes=4, seed=1), seed=0)
    s = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
    grids, probs = image_distribution(bb, PROMPTS[0], s)
    heads = _medusa(bb, scale=0.3)
    dec = SpeculativeDecoder(bb, medusa(heads), rule(), s, paths_from_budget(10, 3, 3), dynamic_nodes=5)
    samples = dec.generate([PROMPTS[0]] * 3000, torch.Generator().manual_seed(5)).codes.flatten(1)
    assert chi_square(samples, grids, probs) > 1e-3


def test_dynamic_tree_refuses_sampled_drafts():
    """Keeping the sampled siblings with the highest q(x) biases them away from q: refused, naming the key (a
    chi-square test of that combination fails, which is how this was found)."""
    bb = random_backbone("tiny", rows=2, cols=3, num_codes=4, seed=1)
    s = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=1.0)
    dec = SpeculativeDecoder(bb, medusa(_medusa(bb), sources__horizontal__draft="sample"), ExactAcceptance(), s,
                             paths_from_budget(10, 3, 3), dynamic_nodes=5)
    with pytest.raises(ValueError, match="`draft: topk` on decoder.proposer or its sources"):
        dec.generate(PROMPTS[:1], torch.Generator().manual_seed(0))
