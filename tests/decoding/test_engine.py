"""The engine: greedy speculative decoding equals greedy AR token for token; batches whose rows accept
different lengths; forced tokens; metrics; bad input."""

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance, TypicalAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import HorizontalSource, JacobiProposer, SpatialProposer, VerticalSource
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.draft import DraftHeads, HeadsConfig

PROMPTS = ["a red circle", "a large blue square on the left", "a green ring at the top", "a small cross"]


@pytest.fixture(scope="module")
def bb():
    from hawkspec.testing import build_random_backbone

    return build_random_backbone(rows=5, cols=5, num_codes=64, seed=3)


@pytest.fixture(scope="module")
def heads(bb):
    h = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), bb)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return h


def medusa(heads, **keys):
    """``conf/decoder/proposer/medusa.yaml`` with ``heads`` (``keys``: its config keys, dots as ``__``)."""
    return proposer_from_config("medusa", {"horizontal": heads}, **keys)


def hawk(heads, name: str = "hawk", **keys):
    """``conf/decoder/proposer/<name>.yaml`` with ``heads`` for both sources (``keys`` as for :func:`medusa`)."""
    return proposer_from_config(name, {"horizontal": heads, "vertical": heads}, **keys)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize(
    "name",
    ["medusa", "hawk", "hawk_horizontal_first", "hawk_vertical_only", "jacobi", "jacobi_spatial", "hawk_jacobi",
     "hawk_jacobi_first"],
)
def test_greedy_speculative_equals_greedy_ar(bb, heads, cfg_scale, name):
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=cfg_scale)
    proposer = {
        "medusa": lambda: medusa(heads),
        "hawk": lambda: hawk(heads),
        "hawk_horizontal_first": lambda: hawk(heads, order=["horizontal", "vertical"], sources__vertical__candidates=2),
        "hawk_vertical_only": lambda: proposer_from_config("hawk_vertical_only", {"vertical": heads}),
        "jacobi": lambda: JacobiProposer(),
        "jacobi_spatial": lambda: JacobiProposer(init="spatial"),
        "hawk_jacobi": lambda: hawk(heads, "hawk_jacobi", order=["vertical", "horizontal", "jacobi"]),
        "hawk_jacobi_first": lambda: hawk(heads, "hawk_jacobi"),
    }[name]()
    paths = paths_from_budget(8, 8, 1) if "jacobi" in name else paths_from_budget(12, 3, 3)
    dec = SpeculativeDecoder(bb, proposer, GreedyAcceptance(), s, paths)
    # Jacobi's initial guesses are random even under greedy decoding, so the step counts depend on the generator
    out = dec.generate(PROMPTS, torch.Generator().manual_seed(0))
    ref = ar_generate(bb, PROMPTS, s)
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(out.codes, ref.codes)
    assert out.accepted_tokens.sum() > 0
    # rows accepted different lengths in the same batch
    assert len(set(out.forwards_per_image.tolist())) > 1


def test_oracle_heads_accept_everything(bb):
    """A stub whose drafts are always right: each step commits the full tree depth (+ bonus)."""
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=1.0)
    ref = ar_generate(bb, PROMPTS[:1], s)

    class Oracle(SpatialProposer):
        def __init__(self, heads):
            super().__init__({"horizontal": HorizontalSource(heads)})

        def propose(self, src_hidden, root_pos, code_pos, pool_size, generator):
            pools = super().propose(src_hidden, root_pos, code_pos, pool_size, generator)
            truth = ref.tokens[0, code_pos.clamp(min=0)] - bb.layout.code_offset  # (B, J)
            pools.tokens[..., 0] = torch.where(code_pos >= 0, truth, -1)
            return pools

    h = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=False), bb)
    dec = SpeculativeDecoder(bb, Oracle(h), GreedyAcceptance(), s, [(0,), (0, 0), (0, 0, 0)])
    out = dec.generate(PROMPTS[:1])
    assert torch.equal(out.tokens, ref.tokens)
    steps, committed = out.extras["steps"].item(), out.extras["committed"].item()
    assert committed / steps > 3.5  # 3 drafts + bonus per step, plus free end-of-line tokens


def test_never_accepting_drafts_is_ar_speed(bb, heads):
    class Never(ExactAcceptance):  # overriding try_candidate turns the point-mass shortcut off by itself
        def try_candidate(self, r, x, q, u):
            acc, r_new = super().try_candidate(r, x, q, u)
            return torch.zeros_like(acc), r_new

    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=1.0)
    out = SpeculativeDecoder(bb, medusa(heads), Never(), s, paths_from_budget(8, 3, 3)).generate(
        PROMPTS, torch.Generator().manual_seed(0)
    )
    assert out.accepted_tokens.sum() == 0
    # forced end-of-line tokens still come for free along the path
    L = bb.grid.length
    assert (out.forwards_per_image <= L).all()
    assert (out.tokens[:, bb.grid.forced_mask()] == bb.eol_token_id).all()


def test_sampled_decoding_is_seeded_and_valid(bb, heads):
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=3.0)
    dec = SpeculativeDecoder(bb, hawk(heads), ExactAcceptance(), s, paths_from_budget(12, 3, 3))
    a = dec.generate(PROMPTS, torch.Generator().manual_seed(5))
    b = dec.generate(PROMPTS, torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    forced = bb.grid.forced_mask()
    assert (a.tokens[:, forced] == bb.eol_token_id).all()
    assert (a.codes >= 0).all() and (a.codes < bb.num_codes).all()
    assert a.accept_map.shape == (4, 5, 5)


def test_typical_is_labelled_lossy(bb, heads):
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=1.0)
    dec = SpeculativeDecoder(bb, medusa(heads), TypicalAcceptance(), s, paths_from_budget(8, 3, 3))
    assert not dec.lossless
    assert SpeculativeDecoder(bb, medusa(heads), ExactAcceptance(), s, [(0,)]).lossless


def test_tree_larger_than_maximum_is_refused(bb, heads):
    with pytest.raises(ValueError, match="decoder.tree.max_nodes"):
        SpeculativeDecoder(bb, medusa(heads), ExactAcceptance(), SamplingConfig(top_k=16),
                           paths_from_budget(64, 3, 4), max_tree_nodes=32)


def test_heads_for_another_backbone_are_refused(bb, heads):
    from hawkspec.testing import build_random_backbone

    other = build_random_backbone(rows=4, cols=4, num_codes=64)
    with pytest.raises(ValueError, match="another backbone.*grid="):
        SpeculativeDecoder(other, medusa(heads), ExactAcceptance(), SamplingConfig(top_k=16), [(0,)])


def test_bad_proposer_settings(heads):
    with pytest.raises(ValueError, match="decoder.proposer.vsd=5 exceeds"):
        VerticalSource(heads, vsd=5)
    with pytest.raises(ValueError, match="decoder.proposer.order"):
        SpatialProposer({"horizontal": HorizontalSource(heads), "vertical": VerticalSource(heads)}, order=["diagonal"])
    with pytest.raises(ValueError, match="decoder.proposer.draft"):
        HorizontalSource(heads, draft="beam")
    with pytest.raises(ValueError, match="decoder.proposer.sources is empty"):
        SpatialProposer({})
    with pytest.raises(ValueError, match="decoder.proposer.init"):
        JacobiProposer(init="zeros")


def test_hawk_jacobi_fills_the_slots_the_heads_leave_empty(bb, heads):
    """Past the horizontal heads' reach (no vertical draft cached yet), the pool's first slot holds the draft
    that the last verification forward drew for that position, with that forward's distribution as its q;
    point-mass members get a one-hot q."""
    s = SamplingConfig(temperature=1.0, top_k=None, cfg_scale=1.0)
    proposer = hawk(heads, "hawk_jacobi", order=["vertical", "horizontal", "jacobi"])
    proposer.bind(bb, s)
    proposer.start(1, torch.device("cpu"))
    K, n = bb.num_codes, heads.config.num_horizontal
    probs = torch.softmax(torch.randn(1, 6, K, generator=torch.Generator().manual_seed(0)), -1)
    codes = torch.full((1, bb.grid.length), -1)
    codes[0, 0] = 5
    node_pos = torch.arange(6)[None]  # nodes at body positions 0..5 predict positions 1..6
    proposer.observe_tree(probs, node_pos, codes, torch.Generator().manual_seed(1))
    code_pos = torch.tensor([[1, 2, 3, 4]])  # position 4 is past the 3 horizontal heads from root 0
    src = torch.randn(1, bb.hidden_size)
    pools = proposer.propose(src, torch.tensor([0]), code_pos, 2, torch.Generator().manual_seed(2))
    tok, q = pools.tokens[0], pools.q[0]
    assert n == 3 and (tok[:3] >= 0).all()  # the heads fill depths 1-3: no room for Jacobi drafts there
    carried = proposer.sources["jacobi"].drafts.tok[0, 4]
    assert carried >= 0 and tok[3, 0] == carried and tok[3, 1] == -1
    assert torch.allclose(q[3, 0], probs[0, 3])  # node at position 3 predicted position 4
    assert torch.equal(q[0, 0], torch.nn.functional.one_hot(tok[0, 0], K).float())


def test_hawk_drafts_from_the_horizontal_logits_its_observe_made(bb, heads, monkeypatch):
    """Hawk runs every head once per step (in observe, on the accepted tokens): the horizontal logits it keeps
    for the next proposal are the heads' logits at that proposal's src_hidden, every step."""
    from hawkspec.decoding.proposers.sources import HorizontalSource

    seen = []
    original = HorizontalSource.propose

    def checked(self, src_hidden, root_pos, code_pos, size, generator):
        logits = self.next_logits
        if logits is not None:
            live = root_pos < bb.grid.length - 1  # finished rows keep a stale src_hidden and draft nothing
            torch.testing.assert_close(logits[live], self.heads.horizontal(src_hidden)[live], atol=1e-5, rtol=1e-4)
        seen.append(logits is not None)
        return original(self, src_hidden, root_pos, code_pos, size, generator)

    monkeypatch.setattr(HorizontalSource, "propose", checked)
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=3.0)
    dec = SpeculativeDecoder(bb, hawk(heads), ExactAcceptance(), s, paths_from_budget(12, 3, 3))
    dec.generate(PROMPTS, torch.Generator().manual_seed(0))
    assert seen[0] is False and all(seen[1:]) and len(seen) > 5  # only the first step has no observe before it


@pytest.mark.parametrize("a, b", [(3, 7), (7, 3)])
def test_jacobi_drafts_of_sibling_nodes_keep_one_nodes_token_and_q(bb, a, b):
    """Siblings in a tree predict the same position: the carried draft is the first node's, token and q together
    (a token from one sibling with another's q would break exactness)."""
    from hawkspec.decoding.proposers.jacobi import JacobiDrafts

    K = bb.num_codes
    drafts = JacobiDrafts(bb.grid, K, torch.device("cpu"))
    drafts.start(1, torch.device("cpu"))
    probs = torch.nn.functional.one_hot(torch.tensor([0, a, b]), K).float()[None]  # (1, 3, K) point masses
    node_pos = torch.tensor([[1, 2, 2]])  # the root at 1; two siblings at position 2 both predict position 3
    codes = torch.full((1, bb.grid.length), -1)
    codes[0, :2] = 1
    drafts.observe(probs, node_pos, codes, torch.Generator().manual_seed(0))
    assert drafts.tok[0, 2] == 0 and drafts.tok[0, 3] == a
    assert torch.equal(drafts.q[0, 3], probs[0, 1])


def test_the_point_mass_shortcut_is_an_explicit_opt_in():
    """A rule that overrides try_candidate is never silently bypassed by the exact rule's draw() shortcut."""
    from hawkspec.decoding.acceptance import GroupedAcceptance, LanternAcceptance

    class Custom(ExactAcceptance):
        def try_candidate(self, r, x, q, u):
            return super().try_candidate(r, x, q, u)

    class Restated(Custom):
        point_mass_shortcut = True

    assert ExactAcceptance.point_mass_shortcut and GreedyAcceptance.point_mass_shortcut
    assert not Custom.point_mass_shortcut and Restated.point_mass_shortcut
    assert not GroupedAcceptance.point_mass_shortcut and not LanternAcceptance.point_mass_shortcut


def test_a_proposer_built_from_its_yaml_in_python_names_the_source_key(heads):
    """proposer_from_config builds the preset's YAML with heads in memory; its errors name the source's own key."""
    from hawkspec.decoding.proposers.config import proposer_from_config

    with pytest.raises(ValueError, match=r"decoder\.proposer\.sources\.vertical\.vsd=5 exceeds"):
        proposer_from_config("hawk", {"horizontal": heads, "vertical": heads}, sources__vertical__vsd=5)
