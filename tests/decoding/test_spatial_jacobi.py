"""Spatial Jacobi (ours): a lane of nodes one row below the root in every verification forward, row-causal, whose
outputs become drafts verified by the exact raster chain (``spatial_jacobi``, ``hawk_spatial_jacobi``).

Lossless on the enumerable model (one prompt, a mixed batch, and inside Hawk's pool), greedy equals AR, the lane's
geometry worked out by hand, and the lane's targets equal an uncached recompute in which each lane node sees only
the committed tokens and the lane before it (never the chain's drafts).
"""

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.base import ImageGrid
from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import HorizontalSource, JacobiProposer, JacobiSource, SpatialProposer, VerticalSource
from hawkspec.decoding.proposers.jacobi import JacobiDrafts
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import EAGER, ExecutionMode
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.metrics.lossless import chi_square, image_distribution
from hawkspec.testing import compose, peaky, random_backbone, random_heads, the_decoder

PROMPTS = ["a red circle", "a blue square"]
SAMPLING = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
N_SAMPLES = 3000
ALPHA = 1e-3


@pytest.fixture(scope="module")
def setup():
    """test_lossless.py's enumerable model: a 2x3 grid of 4 codes (W = 4), peaky and prompt-dependent, CFG, top-k."""
    from hawkspec.testing import build_random_backbone

    bb = peaky(build_random_backbone(rows=2, cols=3, num_codes=4, seed=1), scale=0.3, seed=0)
    return bb, [image_distribution(bb, prompt, SAMPLING) for prompt in PROMPTS]


def spatial(bb, lane=2, window=1, rule=None, s=SAMPLING, mode=EAGER):
    """A short chain, so the lane drafts where it does not reach."""
    return SpeculativeDecoder(bb, JacobiProposer(lane=lane), rule or ExactAcceptance(), s,
                              paths_from_budget(window, window, 1), mode=mode)


def test_spatial_jacobi_is_lossless(setup):
    bb, [(grids, probs), _] = setup
    out = spatial(bb).generate([PROMPTS[0]] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 0.5  # lane drafts are really accepted
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


def test_spatial_jacobi_is_lossless_in_a_mixed_batch(setup):
    bb, dists = setup
    codes = spatial(bb, lane=3, window=2).generate(PROMPTS * (N_SAMPLES // 2),
                                                   torch.Generator().manual_seed(321)).codes.flatten(1)
    for i, (grids, probs) in enumerate(dists):
        assert chi_square(codes[i::2], grids, probs) > ALPHA, PROMPTS[i]


def test_lane_in_hawks_pool_is_lossless(setup):
    bb, [(grids, probs), _] = setup
    heads = random_heads(bb, scale=0.3, num_horizontal=2)
    prop = SpatialProposer({"jacobi": JacobiSource(lane=2), "vertical": VerticalSource(heads, draft="sample", vsd=1),
                            "horizontal": HorizontalSource(heads, draft="sample")},
                           order=["jacobi", "vertical", "horizontal"], priority=["vertical", "horizontal"])
    dec = SpeculativeDecoder(bb, prop, ExactAcceptance(), SAMPLING, paths_from_budget(4, 2, 2))
    out = dec.generate([PROMPTS[0]] * N_SAMPLES, torch.Generator().manual_seed(7))
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


@pytest.mark.parametrize("lane, window", [(2, 2), (4, 3), (5, 1)])
def test_greedy_spatial_jacobi_equals_greedy_ar(lane, window):
    bb = random_backbone("tiny", rows=4, cols=5, num_codes=32, seed=0)
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=2.0)
    prompts = ["a large red circle in the center", "a small blue square on the left"]
    ar = ar_generate(bb, prompts, s).tokens
    out = spatial(bb, lane, window, GreedyAcceptance(), s).generate(prompts, torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, ar)
    heads = random_heads(bb)
    prop = SpatialProposer({"jacobi": JacobiSource(lane=lane), "vertical": VerticalSource(heads, vsd=1),
                            "horizontal": HorizontalSource(heads)}, order=["jacobi", "vertical", "horizontal"],
                           priority=["vertical", "horizontal"])
    dec = SpeculativeDecoder(bb, prop, GreedyAcceptance(), s, paths_from_budget(6, 3, 2))
    assert torch.equal(dec.generate(prompts, torch.Generator().manual_seed(0)).tokens, ar)


def test_lane_geometry_by_hand():
    """3 x 3 codes with end-of-line tokens at 3, 7, 11 (W = 4, L = 12), a lane of 3 nodes, roots 1 and 9 (batch of 2).

    Root 1: the lane ends one row below the root's successor -- positions 1 + 4 - 3 = 2, 3, 4 (predicting 3, 4, 5):
    2 has no carried draft and nothing above it (code 0), 3 is an end-of-line token (-1), 4 carries a draft (6).
    Root 9: positions 10, 11 and 12, which is past the image (-1); 10 takes the committed code above it (6 -> 2).
    """
    d = JacobiDrafts(ImageGrid(3, 3, eol=True), 8, torch.device("cpu"))
    d.start(2, torch.device("cpu"))
    d.tok[0, 4] = 6  # a draft carried at 4 (row 1, column 0) for image 0
    codes = torch.full((2, 12), -1)
    codes[:, :3] = torch.tensor([[1, 2, 3], [4, 5, 6]])
    codes[1, 4:7] = torch.tensor([7, 0, 2])
    codes[1, 8:10] = torch.tensor([5, 5])
    pos, code = d.lane(torch.tensor([1, 9]), codes, width=3, W=4)
    assert pos.tolist() == [[2, 3, 4], [10, 11, -1]]
    assert code[0].tolist() == [0, -1, 6] and code[1, :2].tolist() == [2, -1]


def test_lane_targets_are_row_causal():
    """The first step's lane targets equal a fresh run over the committed tokens (the root) and the lane nodes up to
    each one, at their positions: the chain's drafts, in the same forward, are invisible to the lane."""
    from hawkspec.decoding.sampling import combine_cfg, target_probs

    bb = random_backbone("tiny", rows=3, cols=4, num_codes=32, seed=0)  # W = 5
    s = SamplingConfig(temperature=1.0, top_k=None, cfg_scale=2.0)
    prop = JacobiProposer(lane=3)
    seen = {}
    lane, observe = prop.lane, prop.observe_tree

    def record_lane(root_pos, codes):
        out = lane(root_pos, codes)
        seen.setdefault("lane", out)
        return out

    def record_tree(probs, node_pos, codes, generator, chain=False):
        seen.setdefault("probs", probs.clone())
        return observe(probs, node_pos, codes, generator, chain)

    prop.lane, prop.observe_tree = record_lane, record_tree
    dec = SpeculativeDecoder(bb, prop, ExactAcceptance(), s, paths_from_budget(3, 3, 1))
    out = dec.generate(["a red circle"], torch.Generator().manual_seed(0))
    pos, code = seen["lane"]
    assert pos[0].tolist() == [2, 3, 4]  # root 0: 0 + 5 - 3
    lane_p = seen["probs"][0, -3:]  # the lane's targets come after the chain's
    root_tok = out.tokens[:, :1]
    lane_tok = torch.where(code >= 0, bb.code_token_ids[code.clamp(min=0)], bb.eol_token_id)
    for j in range(3):
        seq = torch.cat([root_tok, lane_tok[:, : j + 1]], dim=1)
        depth = torch.cat([torch.zeros(1, dtype=torch.long), pos[0, : j + 1]])
        state, _ = bb.prefill(bb.encode(["a red circle"]), cfg=True, reserve=8)
        h = bb.forward(state, seq.repeat(2, 1), depth=depth)[:, -1]
        ref = target_probs(combine_cfg(bb.code_logits(h), 2, s.cfg_scale), s)[0]
        torch.testing.assert_close(lane_p[j], ref, atol=1e-5, rtol=1e-4)


def test_presets_and_a_lane_too_wide():
    bb = random_backbone("tiny", rows=12, cols=12, num_codes=32, seed=0)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", ["eval.decoders=[ar,spatial_jacobi]"])
        wide = compose("eval", ["eval.decoders=[spatial_jacobi]", "eval.decoders.spatial_jacobi.proposer.lane=13"])
    dec = build_decoder(the_decoder(cfg, "spatial_jacobi"), bb, SAMPLING)
    assert dec.lossless and dec.lane == 6 and the_decoder(cfg, "spatial_jacobi").tree.max_depth == 8
    assert dec.describe()["proposer"]["lane"] == 6
    with pytest.raises(ValueError, match=r"eval.decoders.spatial_jacobi.proposer.lane=13: the lane holds at most"):
        build_decoder(the_decoder(wide, "spatial_jacobi"), bb, SAMPLING)


@pytest.mark.slow
def test_lane_runs_inside_a_compiled_step():
    """The lane has a fixed width, so the whole step (tree + lane) compiles: greedy still equals AR."""
    bb = random_backbone("tiny", rows=3, cols=4, num_codes=32, seed=0)
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=2.0)
    prompts = ["a large red circle in the center", "a small blue square on the left"]
    dec = spatial(bb, lane=2, window=2, rule=GreedyAcceptance(), s=s, mode=ExecutionMode("step"))
    out = dec.generate(prompts, torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, ar_generate(bb, prompts, s).tokens)
