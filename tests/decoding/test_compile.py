"""Compiled decoding forwards (``eval.compile=forward``) change no decision: greedy speculative == greedy AR
(eager), AR compiled == AR eager, the exact rule stays lossless, and transformers' compiled ``generate`` (static
cache) agrees. Compiling takes a minute or more on a CPU: slow."""

import pytest
import torch

from hawkspec.backbones.hf_reference import hf_generate
from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ARDecoder, ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import JacobiProposer
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import ExecutionMode
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.testing import peaky, random_backbone, random_heads

pytestmark = pytest.mark.slow
PROMPTS = ["a large red circle in the center", "a small blue square on the left"]


def hawk(heads, draft: str = "topk", vsd: int | None = None):
    """``conf/decoder/proposer/hawk.yaml`` with ``heads``: both sources drafting ``draft``, vertical depth ``vsd``."""
    return proposer_from_config("hawk", {"horizontal": heads, "vertical": heads}, sources__horizontal__draft=draft,
                                sources__vertical__draft=draft, sources__vertical__vsd=vsd)


def test_compiled_decoding_equals_eager():
    bb = random_backbone("tiny", rows=3, cols=3, num_codes=32)
    s = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    heads = random_heads(bb)
    eager = ar_generate(bb, PROMPTS, s).tokens
    forward = ExecutionMode("forward")
    decoders = [SpeculativeDecoder(bb, hawk(heads, vsd=1), GreedyAcceptance(), s, paths_from_budget(6, 3, 2),
                                   mode=forward),
                SpeculativeDecoder(bb, JacobiProposer(), GreedyAcceptance(), s, paths_from_budget(6, 6, 1), mode=forward)]
    assert torch.equal(ARDecoder(bb, s, mode=forward).generate(PROMPTS).tokens, eager)
    for dec in decoders:
        assert torch.equal(dec.generate(PROMPTS, torch.Generator().manual_seed(0)).tokens, eager)
    s1 = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=1.0)
    ar = ARDecoder(bb, s1, mode=forward)
    assert torch.equal(ar.generate(PROMPTS).tokens, hf_generate(bb, PROMPTS, s1, compile="forward"))


def test_exact_rule_is_lossless_compiled():
    from hawkspec.metrics.lossless import chi_square, image_distribution

    bb = peaky(random_backbone("tiny", rows=2, cols=3, num_codes=4, seed=1), seed=0)
    s = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
    heads = random_heads(bb, scale=0.3)
    grids, probs = image_distribution(bb, PROMPTS[0], s)
    dec = SpeculativeDecoder(bb, hawk(heads, draft="sample", vsd=1), ExactAcceptance(), s,
                             paths_from_budget(6, 3, 3), mode=ExecutionMode("forward"))
    samples = dec.generate([PROMPTS[0]] * 3000, torch.Generator().manual_seed(123)).codes.flatten(1)
    assert chi_square(samples, grids, probs) > 1e-3
