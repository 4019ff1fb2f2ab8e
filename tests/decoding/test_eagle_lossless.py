"""EAGLE with the exact rule is lossless: the chi-square test of tests/decoding/test_lossless.py (2x3 grid,
4 codes, CFG and top-k, every image enumerated) for top-k and sampled drafts, plain and spatial; the
forgetful-residual bug is caught with EAGLE's pools too."""

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import EagleProposer
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.eagle import EagleConfig, EagleDrafter
from hawkspec.metrics.lossless import chi_square, image_distribution
from hawkspec.testing import ExactByTries, ForgetfulResidual

PROMPT = "a red circle"
SAMPLING = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
N_SAMPLES = 3000
ALPHA = 1e-3
pytestmark = pytest.mark.slow  # 3,000 images per decoder: 20-80 s each on 2 shared cores


@pytest.fixture(scope="module")
def setup():
    from hawkspec.testing import build_random_backbone, peaky

    bb = peaky(build_random_backbone(rows=2, cols=3, num_codes=4, seed=1), scale=0.3, seed=0)
    drafters = {}
    for spatial in (False, True):
        m = EagleDrafter.for_backbone(EagleConfig(spatial=spatial), bb)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # drafts that differ from the target
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        drafters[spatial] = m.eval()
    grids, probs = image_distribution(bb, PROMPT, SAMPLING)
    return bb, drafters, grids, probs


@pytest.mark.parametrize("draft, spatial, rule", [
    ("topk", False, ExactAcceptance), ("topk", True, ExactByTries), ("sample", False, ExactAcceptance),
    ("sample", True, ExactAcceptance)])
def test_exact_eagle_is_lossless(setup, draft, spatial, rule):
    bb, drafters, grids, probs = setup
    make = lambda: EagleProposer(drafter=drafters[spatial], draft=draft)  # noqa: E731
    paths = paths_from_budget(10, 3, 3)  # three codes deep: crosses the end-of-line token
    out = SpeculativeDecoder(bb, make(), rule(), SAMPLING, paths).generate(
        [PROMPT] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 0.5  # the drafts are really exercised (of 6 codes, step 1 drafts none)
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA
    if rule is ExactAcceptance and not spatial:
        broken = SpeculativeDecoder(bb, make(), ForgetfulResidual(), SAMPLING, paths).generate(
            [PROMPT] * N_SAMPLES, torch.Generator().manual_seed(123))
        assert chi_square(broken.codes.flatten(1), grids, probs) < ALPHA
