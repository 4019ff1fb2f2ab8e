"""Acceptance maps: recording the source of accepted drafts changes nothing; with the horizontal heads off every
accepted draft is a vertical one; maps of several decoders over the same prompts."""

import pytest
import torch

from hawkspec.analysis.acceptance import SourceRecorder, acceptance_maps, decode_with_sources
from hawkspec.decoding.acceptance import ExactAcceptance
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import JacobiProposer, SpatialProposer
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.draft import DraftHeads, HeadsConfig

PROMPTS = ["a red circle", "a large blue square on the left", "a green ring at the top"]
SAMPLING = SamplingConfig(temperature=1.0, top_k=None, cfg_scale=1.0)


@pytest.fixture(scope="module")
def bb():
    from hawkspec.testing import build_random_backbone

    return build_random_backbone(rows=5, cols=5, num_codes=8, seed=3)  # 8 codes: drafts are often accepted


@pytest.fixture(scope="module")
def heads(bb):
    h = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), bb)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return h


def hawk(heads, name="hawk", **keys):
    """``conf/decoder/proposer/<name>.yaml`` with ``heads`` for both sources (``keys``: config keys, dots as ``__``)."""
    return proposer_from_config(name, {"horizontal": heads, "vertical": heads}, **keys)


def medusa(heads):
    return proposer_from_config("medusa", {"horizontal": heads})


def decoder(bb, proposer, paths=None):
    return SpeculativeDecoder(bb, proposer, ExactAcceptance(), SAMPLING, paths or paths_from_budget(12, 3, 3))


def run(dec, seed=0, record=True):
    g = torch.Generator().manual_seed(seed)
    return decode_with_sources(dec, PROMPTS, g) if record else (dec.generate(PROMPTS, g), {})


@pytest.mark.parametrize("kw", [{}, {"order": ["horizontal", "vertical"], "sources__vertical__candidates": 2},
                                {"sources__horizontal__draft": "sample", "sources__vertical__draft": "sample"},
                                {"name": "hawk_jacobi", "order": ["vertical", "horizontal", "jacobi"]}])
def test_recording_changes_nothing(bb, heads, kw):
    dec = decoder(bb, hawk(heads, **kw))
    out, src = run(dec)
    ref, _ = run(dec, record=False)
    assert torch.equal(out.codes, ref.codes) and torch.equal(out.accept_map, ref.accept_map)
    assert out.forwards == ref.forwards
    assert isinstance(dec.proposer, SpatialProposer)  # unwrapped again
    acc = out.accept_map > 0
    assert acc.any()
    assert not (src["vertical"] & ~acc).any()  # only accepted drafts have a source
    assert not (src["vertical_only"] & ~src["vertical"]).any()
    assert not src["vertical"][:, 0].any() and not src["vertical_offered"][:, 0].any()  # nothing above row 0
    assert src["vertical"].any()


def test_vertical_only_proposer_accepts_only_vertical_drafts(bb, heads):
    dec = decoder(bb, proposer_from_config("hawk_vertical_only", {"vertical": heads}))
    out, src = run(dec, seed=1)
    acc = out.accept_map > 0
    assert acc.any()
    assert torch.equal(src["vertical"], acc)
    assert torch.equal(src["vertical_only"], acc)  # no horizontal candidates to share them


def test_recorded_drafts_are_the_pools(bb, heads):
    """The recorder's vertical drafts at a position are the ones the pool merged there (top-k: the pool starts
    with them, vertical first)."""
    proposer = hawk(heads)
    dec = decoder(bb, proposer)
    rec = SourceRecorder(proposer)
    seen = []
    inner_propose = proposer.propose

    def spy(src_hidden, root_pos, code_pos, pool_size, generator):
        pools = inner_propose(src_hidden, root_pos, code_pos, pool_size, generator)
        seen.append((code_pos.clone(), pools.tokens.clone(), proposer.vertical_drafts(code_pos).clone()))
        return pools

    proposer.propose = spy
    try:
        with dec.observed(rec):
            dec.generate(PROMPTS, torch.Generator().manual_seed(2))
    finally:
        del proposer.propose
    code_pos, pool, v = seen[-1]
    for b in range(len(PROMPTS)):
        for j in range(code_pos.shape[1]):
            p = int(code_pos[b, j])
            if p >= 0:
                assert torch.equal(rec.vertical[b, p], v[b, j])
                drafts = [int(x) for x in v[b, j] if x >= 0]
                assert [int(x) for x in pool[b, j, : len(drafts)]] == list(dict.fromkeys(drafts))


def test_maps_of_several_decoders(bb, heads):
    decs = {"medusa": decoder(bb, medusa(heads)), "hawk": decoder(bb, hawk(heads)),
            "sjd": decoder(bb, JacobiProposer(), paths_from_budget(6, 6, 1))}
    res = acceptance_maps(decs, PROMPTS, batch_size=2, seed=0)
    assert list(res) == ["medusa", "hawk", "sjd"]
    grid = bb.grid
    for name, r in res.items():
        assert r.accepted.shape == (len(PROMPTS), grid.rows, grid.cols)
        assert r.map.shape == (grid.rows, grid.cols) and 0 < r.acceptance_rate < 1
        assert r.step_compression(grid) > 1
    assert res["medusa"].sources == {} and res["medusa"].vertical_share is None
    assert 0 < res["hawk"].vertical_share <= 1
    assert res["hawk"].source_map("vertical").shape == (grid.rows, grid.cols)
    # same seeds per batch as a direct run
    g = torch.Generator().manual_seed(0)
    direct = decs["hawk"].generate(PROMPTS[:2], g)
    assert torch.equal(res["hawk"].accepted[:2], direct.accept_map)
    with pytest.raises(TypeError, match="no vertical drafts"):
        SourceRecorder(medusa(heads))
