"""The one proposer protocol and the Decoder protocol: every proposer and draft source is a Proposer; AR and the
speculative decoders are Decoders; a proposer's per-batch state is what it declares (state()), and a step that
keeps that memory in place (ExecutionMode(persist_every_step=True), what CUDA graphs need) decides as eager."""

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance
from hawkspec.decoding.build import ARDecoder, NamedDecoder
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.output import Decoder
from hawkspec.decoding.proposers import (DRAFTS, DraftSource, EagleProposer, EagleSource, HorizontalSource,
                                         JacobiProposer, JacobiSource, PACProposer, Proposer, SpatialProposer,
                                         VerticalSource)
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import EAGER, ExecutionMode
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.testing import build_random_backbone, random_heads

PROMPTS = ["a red circle", "a blue square on the left"]
SAMPLING = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=3.0)


@pytest.fixture(scope="module")
def bb():
    return build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)


def test_one_proposer_protocol():
    assert DraftSource is Proposer and EagleSource is EagleProposer
    for cls in (SpatialProposer, HorizontalSource, VerticalSource, JacobiSource, JacobiProposer, PACProposer,
                EagleProposer):
        assert issubclass(cls, Proposer)
    assert DRAFTS == ("topk", "sample")
    with pytest.raises(ValueError, match=r"decoder.proposer.draft must be one of \('topk', 'sample'\)"):
        EagleProposer(path="x", draft="beam")
    with pytest.raises(ValueError, match="my.node.draft must be one of"):
        HorizontalSource(draft="beam", key="my.node")


def test_ar_and_speculative_decoders_are_decoders(bb):
    heads = random_heads(bb)
    spec = SpeculativeDecoder(bb, proposer_from_config("medusa", {"horizontal": heads}), ExactAcceptance(), SAMPLING,
                              paths_from_budget(6, 3, 2))
    named = NamedDecoder("m", bb, proposer_from_config("medusa", {"horizontal": heads}), ExactAcceptance(), SAMPLING,
                         paths_from_budget(6, 3, 2))
    for dec in (ARDecoder(bb, SAMPLING), spec, named):
        assert isinstance(dec, Decoder)
        assert dec.lossless and dec.describe()["name"] == dec.name
    assert spec.name == "medusa" and named.name == "m"
    assert not isinstance(object(), Decoder)


def _proposers(bb):
    heads = random_heads(bb)
    both = {"horizontal": heads, "vertical": heads}
    return {
        "medusa": lambda: proposer_from_config("medusa", {"horizontal": heads}),
        "hawk": lambda: proposer_from_config("hawk", both),
        "hawk_sampled": lambda: proposer_from_config("hawk", both, sources__horizontal__draft="sample",
                                                     sources__vertical__draft="sample"),
        "hawk_jacobi": lambda: proposer_from_config("hawk_jacobi", both),
        "hawk_vertical_only": lambda: proposer_from_config("hawk_vertical_only", {"vertical": heads}),
        "sjd": lambda: JacobiProposer(coupling="gumbel"),
    }


@pytest.mark.parametrize("name", ["medusa", "hawk", "hawk_sampled", "hawk_jacobi", "hawk_vertical_only", "sjd"])
def test_declared_state_is_what_a_persistent_step_keeps(bb, name):
    make = _proposers(bb)[name]
    chain = name in ("hawk_jacobi", "sjd")
    paths = paths_from_budget(6, 6, 1) if chain else paths_from_budget(8, 3, 3)

    def run(mode):
        dec = SpeculativeDecoder(bb, make(), ExactAcceptance(), SAMPLING, paths, mode=mode)
        out = dec.generate(PROMPTS, torch.Generator().manual_seed(7))
        return dec, out

    _, eager = run(EAGER)
    dec, kept = run(ExecutionMode(persist_every_step=True))
    runner = dec.runner
    assert torch.equal(eager.tokens, kept.tokens) and torch.equal(eager.accept_map, kept.accept_map)
    state = dec.proposer.state()
    assert (bool(state) != (name == "medusa")) and all(isinstance(t, torch.Tensor) for t in state.values())
    # everything declared is held in persistent memory, under the proposer's names
    assert {f"proposer.{k}" for k in state} == {k for k in runner.persist.tensors if k.startswith("proposer.")}
    for k, t in state.items():
        assert runner.persist.tensors[f"proposer.{k}"] is t
