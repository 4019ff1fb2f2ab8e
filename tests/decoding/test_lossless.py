"""Lossless, shown: on a backbone small enough to enumerate every image (2x3 grid, 4 codes), the samples of
the exact decoders match the exact target distribution (CFG and top-k on), and a broken rule is caught."""

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import JacobiProposer, JacobiSource, SpatialProposer, VerticalSource
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.metrics.lossless import chi_square, image_distribution
from hawkspec.testing import ExactByTries, ForgetfulResidual

PROMPT = "a red circle"
SAMPLING = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
N_SAMPLES = 3000
ALPHA = 1e-3


@pytest.fixture(scope="module")
def setup():
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=2, cols=3, num_codes=4, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bb.model.parameters():  # a peaky, prompt-dependent random model
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=1), bb)
        for p in heads.parameters():  # drafts that differ from the target
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    grids, probs = image_distribution(bb, PROMPT, SAMPLING)
    return bb, heads, grids, probs


def draw(decode) -> torch.Tensor:
    return decode([PROMPT] * N_SAMPLES, torch.Generator().manual_seed(123)).codes.flatten(1)


def test_enumeration_is_a_distribution(setup):
    _, _, grids, probs = setup
    assert grids.shape == (4**6, 6)
    assert abs(probs.sum().item() - 1) < 1e-9
    assert (probs == 0).sum() > 0  # top-k removes some images entirely


def test_ar_matches_the_enumerated_distribution(setup):
    bb, _, grids, probs = setup
    samples = draw(lambda p, g: ar_generate(bb, p, SAMPLING, g))
    assert chi_square(samples, grids, probs) > ALPHA


@pytest.mark.parametrize(
    "proposer, rule",
    [("medusa", ExactAcceptance), ("hawk", ExactAcceptance), ("hawk", ExactByTries), ("hawk_sampled", ExactAcceptance),
     ("sjd", ExactAcceptance), ("sjd_spatial", ExactAcceptance), ("hawk_jacobi", ExactAcceptance),
     ("vertical_jacobi", ExactAcceptance)],
)
def test_exact_decoders_are_lossless_and_broken_rule_is_caught(setup, proposer, rule):
    bb, heads, grids, probs = setup
    both = {"horizontal": heads, "vertical": heads}
    make = {
        "medusa": lambda: proposer_from_config("medusa", {"horizontal": heads}),
        "hawk": lambda: proposer_from_config("hawk", both),
        "hawk_sampled": lambda: proposer_from_config("hawk", both, sources__horizontal__draft="sample",
                                                     sources__vertical__draft="sample"),
        "sjd": lambda: JacobiProposer(),
        "sjd_spatial": lambda: JacobiProposer(init="spatial"),
        # Jacobi drafts (sampled, own q) mixed with point masses in one pool, past the 3 horizontal heads
        "hawk_jacobi": lambda: proposer_from_config("hawk_jacobi", both, order=["vertical", "horizontal", "jacobi"]),
        "vertical_jacobi": lambda: SpatialProposer({"vertical": VerticalSource(heads), "jacobi": JacobiSource()},
                                                   order=["jacobi", "vertical"], priority=["vertical"]),
    }[proposer]
    if proposer.startswith("sjd"):
        paths = paths_from_budget(4, 4, 1)
    elif proposer.endswith("jacobi"):
        paths = paths_from_budget(8, 5, 2)  # deeper than the 3 horizontal heads: Jacobi drafts fill the gaps
    else:
        paths = paths_from_budget(10, 3, 3)
    exact = SpeculativeDecoder(bb, make(), rule(), SAMPLING, paths)
    out = exact.generate([PROMPT] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 1  # the drafts are really exercised
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA

    # once per proposer is enough; vertical_jacobi's pools hold at most two members (a vertical and a Jacobi
    # draft): too few siblings for the forgetful residual to show reliably at this sample size
    if rule is ExactAcceptance and proposer != "vertical_jacobi":
        broken = SpeculativeDecoder(bb, make(), ForgetfulResidual(), SAMPLING, paths)
        assert chi_square(draw(broken.generate), grids, probs) < ALPHA


@pytest.mark.parametrize("name", ["sjd_gsd", "medusa_lantern"])
def test_relaxed_decoders_are_caught_as_lossy(setup, name):
    """GSD and LANTERN say `lossless: false`, and the same test shows they are right to."""
    from hawkspec.decoding.acceptance import GroupedAcceptance, LanternAcceptance

    bb, heads, grids, probs = setup
    if name == "sjd_gsd":
        dec = SpeculativeDecoder(bb, JacobiProposer(), GroupedAcceptance(group=1, prob_threshold=None,
                                 embed_threshold=None), SAMPLING, paths_from_budget(4, 4, 1))
    else:
        medusa = proposer_from_config("medusa", {"horizontal": heads})
        dec = SpeculativeDecoder(bb, medusa, LanternAcceptance(k=2, delta=0.3), SAMPLING, paths_from_budget(10, 3, 3))
    assert not dec.lossless
    assert chi_square(draw(dec.generate), grids, probs) < ALPHA
