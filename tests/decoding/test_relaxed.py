"""GSD and LANTERN: their degenerate settings are exactly the exact rule, GSD never accepts less often than
the exact rule (GSD's Theorem 1), LANTERN's added mass respects its bound, and the group is the right one."""

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance, GroupedAcceptance, LanternAcceptance
from hawkspec.decoding.acceptance.exact import exact_try
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import JacobiProposer
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.draft import DraftHeads, HeadsConfig

K = 32


class FakeBackbone:
    """Just what the rules bind to: code embeddings and codebook vectors."""

    def __init__(self, k: int = K, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(k, 8, generator=g) * 0.3
        self.book = torch.randn(k, 4, generator=g)

    def code_embeddings(self):
        return self.emb

    def codebook_vectors(self):
        return self.book


def random_dists(m: int, concentration: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = torch.distributions.Dirichlet(torch.full((K,), concentration))
    torch.manual_seed(seed)
    return d.sample((m,)), d.sample((m,))


def acceptance_prob(rule, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(accept) of a draft x ~ q, exactly: sum_x q(x) * P(accept | x). (M, K) -> (M,)."""
    M = p.shape[0]
    x = torch.arange(K).repeat(M)
    r, qq = p.repeat_interleave(K, 0), q.repeat_interleave(K, 0)
    ones = torch.ones(M * K)
    # u -> 1 from below: accepted iff u * q(x) < mass; P(accept | x) = min(1, mass / q(x))
    mass = rule.accept_mass(r, x, qq) if isinstance(rule, GroupedAcceptance) else rule.accept_mass(r, x)
    per_x = torch.where(qq.gather(1, x[:, None]).squeeze(1) > 0,
                        (mass / qq.gather(1, x[:, None]).squeeze(1).clamp_min(1e-30)).clamp(max=1), ones)
    return (q.flatten() * per_x).view(M, K).sum(-1)


@pytest.mark.parametrize("concentration", [0.2, 1.0, 5.0])
@pytest.mark.parametrize("kwargs", [dict(group=1, prob_threshold=None, embed_threshold=None),
                                    dict(group=7, prob_threshold=None, embed_threshold=None),
                                    dict(group=7, prob_threshold=0.15, embed_threshold=0.5)])
def test_gsd_never_accepts_less_than_exact(concentration, kwargs):
    rule = GroupedAcceptance(**kwargs)  # floor on (the default): holds for every draft, hence on average
    rule.bind(FakeBackbone())
    p, q = random_dists(400, concentration, seed=int(concentration * 10))
    exact = torch.minimum(p, q).sum(-1)  # the exact rule's acceptance probability
    gsd = acceptance_prob(rule, p, q)
    assert (gsd >= exact - 1e-5).all(), (gsd - exact).min()
    if kwargs["prob_threshold"] is None:
        assert (gsd > exact + 1e-3).float().mean() > 0.5  # and it really relaxes


def test_raw_gsd_holds_theorem_1_on_a_partition():
    """The theorem's setting: groups that partition the vocabulary (here: blocks of 4 codes). Then
    sum_G min(p(G), q(G)) >= sum_x min(p(x), q(x)) for the raw group ratio."""
    p, q = random_dists(400, 0.2, seed=8)
    pg, qg = p.view(400, -1, 4).sum(-1), q.view(400, -1, 4).sum(-1)
    assert (torch.minimum(pg, qg).sum(-1) >= torch.minimum(p, q).sum(-1) - 1e-6).all()


def test_raw_gsd_with_filters_can_fall_below_exact():
    """Why the floor exists: GSD's groups overlap and are filtered per draft, not a partition, and then the
    raw ratio breaks Theorem 1 on some distributions."""
    rule = GroupedAcceptance(group=7, prob_threshold=0.15, embed_threshold=0.5, floor=False)
    rule.bind(FakeBackbone())
    p, q = random_dists(400, 0.2, seed=2)
    assert (acceptance_prob(rule, p, q) < torch.minimum(p, q).sum(-1) - 1e-3).any()


def test_gsd_point_mass_accepts_group_mass():
    rule = GroupedAcceptance(group=2, prob_threshold=None, embed_threshold=None)
    p, _ = random_dists(50, 1.0, seed=3)
    x = p.argsort(-1)[:, K // 2]  # a middle-ranked draft: two neighbours on each side
    order = p.argsort(-1, descending=True)
    rank = (order == x[:, None]).int().argmax(-1)
    window = torch.stack([order[torch.arange(50), rank + d] for d in (-2, -1, 0, 1, 2)], 1)
    assert torch.allclose(rule.accept_mass(p, x, None), p.gather(1, window).sum(-1))


def test_gsd_filters_drop_far_neighbours():
    bb = FakeBackbone()
    p, q = random_dists(50, 1.0, seed=4)
    x = torch.randint(K, (50,), generator=torch.Generator().manual_seed(0))
    free = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=None)
    strict = GroupedAcceptance(group=7, prob_threshold=1e-9, embed_threshold=None)
    emb_only = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=1e-9)
    emb_only.bind(bb)
    m_free, keep_free = free.members(p, x)
    assert keep_free.sum(-1).min() >= 7  # a full window on at least one side
    assert not strict.members(p, x)[1].any() and not emb_only.members(p, x)[1].any()
    rx = p.gather(1, x[:, None]).squeeze(1)
    assert torch.allclose(strict.accept_mass(p, x, q), q.gather(1, x[:, None]).squeeze(1) * rx / q.gather(1, x[:, None]).squeeze(1))


def test_lantern_mass_respects_its_bounds():
    bb = FakeBackbone()
    p, q = random_dists(200, 0.5, seed=5)
    x = torch.randint(K, (200,), generator=torch.Generator().manual_seed(1))
    rx = p.gather(1, x[:, None]).squeeze(1)
    lantern = LanternAcceptance(k=8, delta=0.1)
    lantern.bind(bb)
    extra = lantern.accept_mass(p, x) - rx
    assert (extra >= 0).all() and (extra <= 0.1 + 1e-6).all() and (extra > 0).any()
    pp = LanternAcceptance(k=8, lam=2.0)
    pp.bind(bb)
    assert (pp.accept_mass(p, x) <= 2 * rx + 1e-6).all()
    # the neighbours are the nearest codebook vectors
    d = torch.cdist(bb.book, bb.book)
    d.fill_diagonal_(float("inf"))
    assert torch.equal(lantern.neighbours[:, 0], d.argmin(-1))


# LANTERN at delta 0 / lam 1 accepts exactly as the exact rule; its residual is the exact one with
# residual=exact (the official residual still zeroes the k + 1 nearest codes after a rejection whose nearest
# neighbour has zero mass: test_official_rules.py)
@pytest.mark.parametrize("rule", [GroupedAcceptance(group=0), LanternAcceptance(delta=0.0, residual="exact"),
                                  LanternAcceptance(lam=1.0, residual="exact")])
def test_degenerate_relaxed_rules_are_exactly_exact(rule):
    bb = FakeBackbone()
    rule.bind(bb)
    p, q = random_dists(300, 0.5, seed=6)
    x = torch.randint(K, (300,), generator=torch.Generator().manual_seed(2))
    u = torch.rand(300, generator=torch.Generator().manual_seed(3))
    for qq in (q, None):
        a1, r1 = rule.try_candidate(p, x, qq, u)
        a2, r2 = exact_try(p, x, qq, u)
        assert torch.equal(a1, a2) and torch.equal(r1, r2)


def test_degenerate_rules_decode_exactly_like_exact():
    """Whole decoders: SJD with GSD group 0 / LANTERN delta 0 (exact residual) give the same images as SJD, seed
    for seed."""
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=4, cols=4, num_codes=32, seed=2)
    s = SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    prompts = ["a red circle", "a blue square"]

    def run(rule, proposer):
        dec = SpeculativeDecoder(bb, proposer, rule, s, paths_from_budget(6, 6, 1) if isinstance(
            proposer, JacobiProposer) else paths_from_budget(6, 3, 2))
        return dec.generate(prompts, torch.Generator().manual_seed(9)).codes

    ref = run(ExactAcceptance(), JacobiProposer())
    assert torch.equal(run(GroupedAcceptance(group=0), JacobiProposer()), ref)
    assert torch.equal(run(LanternAcceptance(delta=0.0, residual="exact"), JacobiProposer()), ref)
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3), bb)

    class ByTries(ExactAcceptance):
        def draw(self, p, generator):
            return None

    def medusa():
        return proposer_from_config("medusa", {"horizontal": heads})

    ref_m = run(ByTries(), medusa())
    assert torch.equal(run(GroupedAcceptance(group=0), medusa()), ref_m)
    assert torch.equal(run(LanternAcceptance(delta=0.0, residual="exact"), medusa()), ref_m)
    # the official residual zeroes the nearest codes after rejections beside zero-mass neighbours (top-k 8 of 32)
    assert not torch.equal(run(LanternAcceptance(delta=0.0), medusa()), ref_m)


def test_relaxed_rules_are_labelled_lossy_and_validate():
    assert not GroupedAcceptance().lossless and not LanternAcceptance().lossless
    with pytest.raises(ValueError, match="decoder.acceptance.group"):
        GroupedAcceptance(group=-1)
    with pytest.raises(ValueError, match="decoder.acceptance.delta"):
        LanternAcceptance(delta=-0.1)
    with pytest.raises(ValueError, match="decoder.acceptance.lam"):
        LanternAcceptance(lam=0.5)
