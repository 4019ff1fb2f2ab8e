"""Whole steps compiled (``eval.compile=step``) and the persistent memory CUDA-graph replays need
(:mod:`hawkspec.decoding.static`): decisions are unchanged, steps never read the device back, and every tensor a
step touches keeps its address from step to step and batch to batch."""

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ARDecoder, ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import JacobiProposer
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig, Uniforms, sample
from hawkspec.decoding.static import ExecutionMode, Persistent, StepRunner
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.testing import peaky, random_backbone, random_heads

PROMPTS = ["a large red circle in the center", "a small blue square on the left"]
GREEDY = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)


def hawk(heads, draft: str = "topk", vsd: int | None = None):
    """``conf/decoder/proposer/hawk.yaml`` with ``heads``: both sources drafting ``draft``, vertical depth ``vsd``."""
    return proposer_from_config("hawk", {"horizontal": heads, "vertical": heads}, sources__horizontal__draft=draft,
                                sources__vertical__draft=draft, sources__vertical__vsd=vsd)


@pytest.fixture(scope="module")
def bb():
    return random_backbone("tiny", rows=3, cols=3, num_codes=32)


def test_persistent_memory_keeps_addresses_and_values():
    class Run:
        pass

    run, inner = Run(), Run()
    run.n, run.inner, inner.x = torch.zeros(3), inner, torch.ones(2)
    keep = Persistent()
    assert not keep.adopt({"run": run})  # first sight: records
    n0, x0 = run.n, inner.x
    run.n = run.n + 5  # a step rebinds ...
    inner.x = torch.full((2,), 7.0)
    assert keep.adopt({"run": run})  # ... and the values move into the first tensors
    assert run.n is n0 and inner.x is x0
    assert run.n.tolist() == [5.0] * 3 and inner.x.tolist() == [7.0, 7.0]
    run.prev, run.n = run.n, torch.full((3,), 9.0)  # a new attribute aliasing an old tensor is read before copies
    keep.adopt({"run": run})
    assert run.n.tolist() == [9.0] * 3 and run.prev.tolist() == [5.0] * 3
    run.n = torch.zeros(4)
    with pytest.raises(RuntimeError, match="run.n"):
        keep.adopt({"run": run}, strict=True)


def test_uniforms_hand_out_a_buffer_in_order_and_count():
    counter = Uniforms(None, torch.Generator().manual_seed(0))
    sample(torch.ones(5, 4), counter)
    sample(torch.ones(2, 4), counter)
    assert counter.taken == 7
    buf = torch.tensor([0.1, 0.9, 0.3])
    u = Uniforms(buf)
    assert sample(torch.ones(2, 4), u).tolist() == [0, 3]
    with pytest.raises(RuntimeError, match="not static"):
        sample(torch.ones(2, 4), u)


def test_replay_memory_decodes_like_eager_and_never_moves(bb):
    """``persist_every_step`` does after every step what a CUDA-graph recording does (state into the persistent
    memory): greedy Hawk still equals AR, across two batches, and no tensor a step touches changes address."""
    eager = ar_generate(bb, PROMPTS, GREEDY).tokens
    kept = ExecutionMode(persist_every_step=True)
    dec = SpeculativeDecoder(bb, hawk(random_heads(bb), vsd=1), GreedyAcceptance(), GREEDY,
                             paths_from_budget(6, 3, 2), mode=kept)
    for _ in range(2):
        assert torch.equal(dec.generate(PROMPTS, torch.Generator().manual_seed(0)).tokens, eager)
    addresses = {p: t.data_ptr() for p, t in dec.runner.persist.tensors.items()}
    assert any(p.startswith("kv.cache.layers[0].keys") for p in addresses)
    assert {"state.tokens", "state.n", "state.hidden", "state.stats.steps"} <= set(addresses)
    assert any(p.startswith("proposer.") for p in addresses)
    dec.generate(PROMPTS[::-1], torch.Generator().manual_seed(1))
    assert {p: t.data_ptr() for p, t in dec.runner.persist.tensors.items()} == addresses
    ar = ARDecoder(bb, GREEDY, mode=kept)
    for _ in range(2):
        assert torch.equal(ar.generate(PROMPTS).tokens, eager)


def test_sampled_steps_with_uniform_buffers_are_reproducible(bb):
    s = SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    # sampled drafts on a branching tree: siblings tried in order against the residual (the bounded tries walk)
    heads = random_heads(bb)
    runs = []
    for _ in range(2):
        dec = SpeculativeDecoder(bb, hawk(heads, draft="sample", vsd=1), ExactAcceptance(), s,
                                 paths_from_budget(6, 3, 2), mode=ExecutionMode(persist_every_step=True))
        runs.append(dec.generate(PROMPTS, torch.Generator().manual_seed(5)).codes)
    assert torch.equal(runs[0], runs[1])


def test_bad_modes_are_refused_naming_the_keys():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="eval.cuda_graphs"):
            ExecutionMode(cuda_graphs=True)
    with pytest.raises(ValueError, match="eval.compile"):
        ExecutionMode("everything")


def test_compiled_steps_decide_like_eager(bb):
    """AR and Medusa with every step compiled as one graph (``fullgraph``: a graph break fails) equal greedy AR
    eager token for token; a second batch reuses the graphs."""
    eager = ar_generate(bb, PROMPTS, GREEDY).tokens
    assert torch.equal(ARDecoder(bb, GREEDY, mode=ExecutionMode("step")).generate(PROMPTS).tokens, eager)
    medusa = proposer_from_config("medusa", {"horizontal": random_heads(bb)})
    dec = SpeculativeDecoder(bb, medusa, GreedyAcceptance(), GREEDY, paths_from_budget(6, 3, 2),
                             mode=ExecutionMode("step"))
    for _ in range(2):
        assert torch.equal(dec.generate(PROMPTS, torch.Generator().manual_seed(0)).tokens, eager)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hawk", "hawk_sampled", "sjd"])
def test_compiled_steps_are_lossless(method):
    """The exact rule with every step compiled: Hawk's top-k spatial pool (a branching tree, the point-mass walk),
    Hawk's sampled drafts (siblings tried in order against the residual: the bounded tries walk) and SJD's chain
    of sampled Jacobi drafts. The image distribution is AR's (enumerated on a model small
    enough), and greedy decoding compiled equals greedy AR."""
    from hawkspec.metrics.lossless import chi_square, image_distribution

    small = peaky(random_backbone("tiny", rows=2, cols=3, num_codes=4, seed=1), seed=0)
    heads = random_heads(small, scale=0.3)

    def decoder(rule, s):
        if method.startswith("hawk"):
            draft = "sample" if method == "hawk_sampled" and not s.greedy else "topk"
            return SpeculativeDecoder(small, hawk(heads, draft=draft, vsd=1), rule, s, paths_from_budget(6, 3, 3),
                                      mode=ExecutionMode("step"))
        return SpeculativeDecoder(small, JacobiProposer(), rule, s, paths_from_budget(6, 6, 1),
                                  mode=ExecutionMode("step"))

    s = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
    grids, probs = image_distribution(small, PROMPTS[0], s)
    samples = decoder(ExactAcceptance(), s).generate([PROMPTS[0]] * 3000, torch.Generator().manual_seed(123))
    assert chi_square(samples.codes.flatten(1), grids, probs) > 1e-3
    g = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    assert torch.equal(decoder(GreedyAcceptance(), g).generate(PROMPTS, torch.Generator().manual_seed(0)).tokens,
                       ar_generate(small, PROMPTS, g).tokens)


def test_each_runner_and_step_kind_compiles_a_code_object_of_its_own():
    """Dynamo checks every entry on a code object at each call; runners sharing one code object made AR (compiled
    first in a bench) pay every other decoder's guards per step. Each runner and key gets its own copy, which
    still runs the same step."""
    from hawkspec.decoding.static import _own_code

    def step(x, rng):
        x.add_(1)

    a, b = StepRunner(ExecutionMode("step")), StepRunner(ExecutionMode("step"))
    codes = [r._body(k, step)._torchdynamo_orig_callable.__code__ for r in (a, b) for k in ("ar", "eol")]
    assert len({id(c) for c in codes}) == 4
    assert a._body("ar", step) is a._body("ar", step)  # compiled once per runner and key
    own = _own_code(lambda x, y=2: x * y, "k")
    assert own(3) == 6 and "[" in own.__qualname__


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["gsd", "lantern"])
def test_lossy_rules_compile_as_whole_steps(bb, rule):
    """GSD's grouped test and LANTERN's relaxed one (lossy, labelled so) compile as one graph each
    (``fullgraph``) with sampled and top-k drafts, and decide as the same static step run eagerly
    (``persist_every_step``: the same counted uniforms)."""
    from hawkspec.decoding.acceptance import GroupedAcceptance, LanternAcceptance

    s = SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    heads = random_heads(bb)

    def make():
        if rule == "gsd":
            return GroupedAcceptance(group=3, prob_threshold=None, embed_threshold=2.25, embed_metric="squared",
                                     window="official", floor=False)
        return LanternAcceptance(k=4, delta=0.1)

    for draft in ("sample", "topk"):
        codes = [SpeculativeDecoder(bb, hawk(heads, draft=draft, vsd=1), make(), s, paths_from_budget(6, 3, 2),
                                    mode=mode).generate(PROMPTS, torch.Generator().manual_seed(5)).codes
                 for mode in (ExecutionMode(persist_every_step=True), ExecutionMode("step"))]
        assert torch.equal(codes[0], codes[1]), draft
