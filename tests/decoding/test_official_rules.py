"""The baselines decide like their authors' code (README "Decoding, precisely"): hand-made distributions whose
decisions are worked out in each test.

* GSD (junhyukso/GSD): window = slice [i-7, i+7) of the ascending sort (7 below, the draft, 6 above), exact
  ratio when fewer than 7 rank below, squared embedding distance, no floor.
* GSD ties: the slice is of a stable ascending sort ordered by token id among equal values.
* LANTERN (jadohu/LANTERN): after a rejection where a neighbour prefix within the bound exists (even one adding
  zero mass), the target is zeroed at the draft's k+1 nearest codes before the residual; all-zero -> uniform.
* Medusa typical (FasterDecoding/Medusa): each candidate judged on its own, the longest accepted path wins
  (ties: the most likely), bonus = argmax of the target at the last accepted node.
* SJD (tyshiwo1/Accelerating-T2I-AR-with-SJD): fresh random drafts carry a one-hot q.
"""

import pytest
import torch

from hawkspec.decoding.acceptance import GroupedAcceptance, LanternAcceptance, TypicalAcceptance
from hawkspec.decoding.acceptance.exact import exact_try
from hawkspec.decoding.walks import walk_longest

K = 20


def ranked_target() -> torch.Tensor:
    """p(c) proportional to c + 1: code c has ascending rank c (0 = least likely)."""
    p = torch.arange(1, K + 1, dtype=torch.float)
    return (p / p.sum()).unsqueeze(0)


class Emb:
    """A backbone with hand-placed code embeddings and codebook vectors."""

    def __init__(self, emb, book=None):
        self.emb, self.book = emb, book if book is not None else emb

    def code_embeddings(self):
        return self.emb

    def codebook_vectors(self):
        return self.book


# ------------------------------------------------------------------------------------------------------ GSD
def test_gsd_official_window_is_seven_below_the_draft_and_six_above():
    p = ranked_target()
    x = torch.tensor([10])
    official = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=None, floor=False, window="official")
    ours = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=None, floor=False, window="symmetric")
    # ascending ranks 3..16 = codes 3..16: 7 below (3..9), the draft (10), 6 above (11..16) -> 14 codes
    assert official.accept_mass(p, x, None).item() == pytest.approx(p[0, 3:17].sum().item())
    assert ours.accept_mass(p, x, None).item() == pytest.approx(p[0, 3:18].sum().item())  # 7 each side: 15
    # a draft with fewer than 7 codes below: the official slice is empty and the exact ratio applies
    low = torch.tensor([4])
    assert official.accept_mass(p, low, None).item() == pytest.approx(p[0, 4].item())
    # with a sampled draft q: min(1, p(G) / q(G)) with the same 14 codes, no floor
    q = torch.zeros(1, K)
    q[0, 10], q[0, 19] = 0.5, 0.5  # q puts mass on the draft and on a code outside the window
    mass = official.accept_mass(p, x, q)  # = q(x) * p(G) / q(G); the engine accepts iff u * q(x) < mass
    assert (mass / q[0, 10]).item() == pytest.approx(p[0, 3:17].sum().item() / 0.5)


def test_gsd_embedding_filter_compares_the_squared_distance():
    p = ranked_target()
    x = torch.tensor([10])
    emb = torch.zeros(K, 2)
    emb[:, 0] = 10.0  # everything far from the draft ...
    emb[10, 0] = 0.0  # ... the draft at the origin
    emb[9, 0] = 0.6  # distance 0.6: squared 0.36 < 0.5 (kept, official), plain 0.6 > 0.5 (dropped, ours)
    emb[11, 0] = 0.8  # squared 0.64: dropped by both
    for metric, kept in (("squared", [9, 10]), ("l2", [10])):
        rule = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=0.5, floor=False,
                                 window="official", embed_metric=metric)
        rule.bind(Emb(emb))
        assert rule.accept_mass(p, x, None).item() == pytest.approx(p[0, kept].sum().item()), metric


def test_gsd_without_floor_can_accept_less_than_exact():
    """The raw official ratio: a window neighbour with q >> p drags the draft below its exact ratio."""
    p = ranked_target()
    q = torch.zeros(1, K)
    q[0, 19], q[0, 12] = 0.05, 0.95  # the draft (ranked highest) and a code 7 ranks below it, in its window
    x = torch.tensor([19])
    raw = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=None, floor=False, window="official")
    floored = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=None, floor=True, window="official")
    assert p[0, 19] / q[0, 19] > 1  # the exact rule accepts for sure
    # group = codes 12..19 (7 below, none above): p(G) = (13 + ... + 20) / 210, q(G) = 1
    raw_ratio = (raw.accept_mass(p, x, q) / q[0, 19]).item()
    assert raw_ratio == pytest.approx(132 / 210)
    assert (floored.accept_mass(p, x, q) / q[0, 19]).item() >= 1.0


def test_gsd_official_window_under_ties_follows_the_ascending_stable_sort():
    """The official window is a slice of ``logits.sort()`` (ascending). Over Lumina-mGPT's 65,536 logits CUDA's
    sort is a stable radix sort (and the CPU sort is stable), so tied codes stand in increasing token-id order:
    among equal probabilities the higher id ranks higher. Worked by hand on 10 codes with group 2 (window: 2
    below, the draft, 1 above):

        p      = [.05, .10, .10, .10, .10, .10, .10, .15, .05, .15]     (code = token id)
        sorted : 0(.05) 8(.05) 1 2 3 4 5 6 (.10 each) 7(.15) 9(.15)

    Draft 4: 2 below = {2, 3}, 1 above = {5} (not 1, 2 or 6 as an index-descending order would give)."""
    p = torch.tensor([[0.05, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.15, 0.05, 0.15]])
    rule = GroupedAcceptance(group=2, prob_threshold=None, embed_threshold=None, floor=False, window="official")
    members, keep = rule.members(p, torch.tensor([4]))
    assert sorted(members[keep].tolist()) == [2, 3, 5]
    # draft 1 (rank 2: codes 0 and 8 below it) -> below {0, 8}, above {2}
    members, keep = rule.members(p, torch.tensor([1]))
    assert sorted(members[keep].tolist()) == [0, 2, 8]
    # draft 8 (rank 1): one code below, fewer than group -> the official slice is empty: exact ratio
    assert rule.accept_mass(p, torch.tensor([8]), None).item() == pytest.approx(0.05)
    # draft 7: below {5, 6}, above {9} (7 and 9 tie at .15; id 9 ranks higher)
    members, keep = rule.members(p, torch.tensor([7]))
    assert sorted(members[keep].tolist()) == [5, 6, 9]
    # the tie order is by token id, which need not be the code index: with code_token_ids reversed, the
    # highest code index has the lowest id, so among the .10 codes 6 ranks lowest and 1 highest
    rule.token_order = torch.arange(9, -1, -1)
    members, keep = rule.members(p, torch.tensor([4]))  # ascending: 8 0 | 6 5 4 3 2 1 | 9 7
    assert sorted(members[keep].tolist()) == [3, 5, 6]


# ------------------------------------------------------------------------------------------------------ LANTERN
def lantern_setup(residual: str, delta: float = 0.1):
    # codes on a line at 0, 1, 2, ...: code 0's neighbours are 1, 2, 3, ... in that order
    book = torch.arange(6, dtype=torch.float).unsqueeze(-1)
    rule = LanternAcceptance(k=1, delta=delta, residual=residual)
    rule.bind(Emb(book, book))
    return rule


def test_lantern_official_zeroes_the_k_plus_one_nearest_codes_after_a_rejection_with_added_mass():
    p = torch.tensor([[0.1, 0.05, 0.3, 0.2, 0.25, 0.1]])
    x, u = torch.tensor([0]), torch.tensor([0.5])
    # k = 1: the added mass is p(1) = 0.05 <= delta: accepted with p(0) + p(1) = 0.15 < u -> rejected
    acc, r = lantern_setup("neighbours").try_candidate(p, x, None, u)
    assert not acc.item()
    # official: zero codes 1 and 2 (k + 1 = 2 nearest) and the draft (point mass), then renormalise
    assert torch.allclose(r, torch.tensor([[0, 0, 0, 0.2, 0.25, 0.1]]) / 0.55)
    acc, r = lantern_setup("exact").try_candidate(p, x, None, u)
    assert not acc.item() and torch.allclose(r, torch.tensor([[0, 0.05, 0.3, 0.2, 0.25, 0.1]]) / 0.9)
    # u below 0.15: accepted thanks to the neighbour's mass (the exact rule would need u < 0.1)
    assert lantern_setup("neighbours").try_candidate(p, x, None, torch.tensor([0.12]))[0].item()


def test_lantern_official_residual_with_a_sampled_draft_and_without_added_mass():
    p = torch.tensor([[0.1, 0.05, 0.3, 0.2, 0.25, 0.1]])
    q = torch.tensor([[0.5, 0.0, 0.0, 0.5, 0.0, 0.0]])
    x, u = torch.tensor([0]), torch.tensor([0.9])
    acc, r = lantern_setup("neighbours").try_candidate(p, x, q, u)  # 0.9 * 0.5 > 0.15: rejected
    # zero codes 1, 2, then max(r - q, 0) = [0, 0, 0, 0, 0.25, 0.1]
    assert not acc.item() and torch.allclose(r, torch.tensor([[0, 0, 0, 0, 0.25, 0.1]]) / 0.35)
    # the nearest neighbour's mass exceeds delta: nothing added, so the residual is the exact one
    p2 = torch.tensor([[0.1, 0.3, 0.05, 0.2, 0.25, 0.1]])
    acc, r = lantern_setup("neighbours").try_candidate(p2, x, None, u)
    assert not acc.item() and torch.allclose(r, exact_try(p2, x, None, u)[1])


def test_lantern_official_zeroes_after_a_prefix_that_adds_zero_mass():
    """The official condition is ``indices != -1`` (a neighbour prefix within the bound exists), not "mass was
    added": a nearest neighbour with p = 0 fits any bound, so the k + 1 nearest codes are zeroed."""
    p = torch.tensor([[0.1, 0.0, 0.3, 0.2, 0.25, 0.15]])
    x, u = torch.tensor([0]), torch.tensor([0.5])
    rule = lantern_setup("neighbours")
    assert rule.accept_mass(p, x).item() == pytest.approx(0.1)  # the prefix {1} adds p(1) = 0
    acc, r = rule.try_candidate(p, x, None, u)  # accepted with 0.1 < u: rejected
    # official: zero codes 1, 2 (k + 1 = 2 nearest) and the draft: [0, 0, 0, 0.2, 0.25, 0.15] / 0.6
    assert not acc.item() and torch.allclose(r, torch.tensor([[0, 0, 0, 0.2, 0.25, 0.15]]) / 0.6)
    # the previous condition (extra > 0) would have kept code 2: the exact residual [0, 0, .3, .2, .25, .15] / .9
    assert not torch.allclose(r, exact_try(p, x, None, u)[1])


def test_lantern_official_all_zero_residual_falls_back_to_uniform():
    """All the target's mass on the draft and its k + 1 nearest codes: after zeroing nothing is left, and the
    official code's ``ones_like`` fallback makes the residual uniform over the codes."""
    p = torch.tensor([[0.5, 0.02, 0.48, 0.0, 0.0, 0.0]])
    x, u = torch.tensor([0]), torch.tensor([0.9])
    acc, r = lantern_setup("neighbours").try_candidate(p, x, None, u)  # 0.5 + 0.02 < 0.9: rejected
    assert not acc.item() and torch.allclose(r, torch.full((1, 6), 1 / 6))


# ------------------------------------------------------------------------------------------------------ Medusa
def typical_tree():
    """root 0 -> A 1, B 2; B -> C 3; A -> D 4. Returns parent, anc, depth."""
    parent = torch.tensor([[-1, 0, 0, 2, 1]])
    T = parent.shape[1]
    anc = torch.zeros(1, T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            anc[0, i, j] = True
            j = int(parent[0, j])
    depth = torch.tensor([[0, 1, 1, 2, 2]])
    return parent, anc, depth


def test_typical_keeps_the_longest_accepted_path_not_the_first_accepted_child():
    V = 4
    # targets: at the root A (code 0) and B (code 1) both pass; at A, D (code 2) fails; at B, C (code 3) passes
    peaked = lambda c: torch.tensor([0.97 if i == c else 0.01 for i in range(V)])  # noqa: E731
    p = torch.stack([torch.tensor([0.5, 0.48, 0.01, 0.01]), peaked(3), peaked(3), peaked(1), peaked(0)]).unsqueeze(0)
    cand = torch.tensor([[0, 0, 1, 3, 2]])
    parent, anc, depth = typical_tree()
    rule = TypicalAcceptance()  # official: threshold min(0.09, 0.3 * exp(-H(p)))
    thr_root = rule.threshold(p[0, 0]).item()
    assert 0.01 < thr_root < 0.48  # A and B pass at the root, the 0.01 codes fail
    ones = torch.ones(1, 5, dtype=torch.bool)
    cur, path, n_path, bonus = walk_longest(rule, p, cand, ~ones, ones, parent, anc, depth,
                                            torch.tensor([True]), max_depth=2)
    assert cur.item() == 3 and n_path.item() == 3 and path[0, :3].tolist() == [0, 2, 3]  # root -> B -> C
    assert bonus.item() == 1  # argmax of the target at C (official fast=True)
    # the first-child walk (ours, walk=first) would stop at A, whose only child D fails
    first = TypicalAcceptance(walk="first")
    assert not first.independent and first.try_candidate(p[:, 0], torch.tensor([0]), None, torch.zeros(1))[0].item()


def test_typical_ties_go_to_the_most_likely_path():
    V = 4
    parent = torch.tensor([[-1, 0, 0, 1, 2]])  # root -> A, B; A -> C; B -> D: two paths of length 2
    T = 5
    anc = torch.zeros(1, T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            anc[0, i, j] = True
            j = int(parent[0, j])
    depth = torch.tensor([[0, 1, 1, 2, 2]])
    root = torch.tensor([0.3, 0.6, 0.05, 0.05])  # A = code 0 (0.3), B = code 1 (0.6)
    below = torch.tensor([0.25, 0.25, 0.25, 0.25])  # everything passes below A and B
    p = torch.stack([root, below, below, below, below]).unsqueeze(0)
    cand = torch.tensor([[0, 0, 1, 2, 3]])
    ones = torch.ones(1, T, dtype=torch.bool)
    cur, path, n_path, _ = walk_longest(TypicalAcceptance(), p, cand, ~ones, ones, parent, anc, depth,
                                        torch.tensor([True]), max_depth=2)
    assert cur.item() == 4 and path[0, :3].tolist() == [0, 2, 4]  # via B: log 0.6 + log 0.25 > log 0.3 + log 0.25


def test_typical_bonus_modes():
    r = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    assert TypicalAcceptance(bonus="argmax").bonus(r, g).item() == 0
    rule = TypicalAcceptance(bonus="typical", epsilon=0.1, delta=10.0)  # threshold 0.1: code 3 is never drawn
    draws = torch.stack([rule.bonus(r, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="decoder.acceptance.bonus"):
        TypicalAcceptance(bonus="best")


def test_typical_decoder_runs_end_to_end_and_is_deterministic_per_seed():
    from hawkspec.decoding.engine import SpeculativeDecoder
    from hawkspec.decoding.proposers.config import proposer_from_config
    from hawkspec.decoding.sampling import SamplingConfig
    from hawkspec.decoding.tree import paths_from_budget
    from hawkspec.heads.draft import DraftHeads, HeadsConfig
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=3, cols=3, num_codes=16, seed=1)
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=2), bb)
    medusa = proposer_from_config("medusa", {"horizontal": heads})
    dec = SpeculativeDecoder(bb, medusa, TypicalAcceptance(), SamplingConfig(top_k=8), paths_from_budget(6, 2, 3))
    a = dec.generate(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    b = dec.generate(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert torch.equal(a.codes, b.codes) and (a.codes >= 0).all()


# ------------------------------------------------------------------------------------------------------ SJD
def test_sjd_fresh_drafts_carry_a_one_hot_q_and_are_judged_like_point_masses():
    from hawkspec.decoding.proposers import JacobiProposer
    from hawkspec.decoding.sampling import SamplingConfig
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=3, cols=3, num_codes=16, seed=1)
    pools = {}
    for init_q in ("onehot", "uniform"):
        prop = JacobiProposer(init_q=init_q)
        prop.bind(bb, SamplingConfig())
        prop.start(1, torch.device("cpu"))
        code_pos = torch.tensor([[1, 2, 3]])
        pools[init_q] = prop.propose(None, torch.tensor([0]), code_pos, 1, torch.Generator().manual_seed(0))
    oh, un = pools["onehot"], pools["uniform"]
    assert torch.equal(oh.tokens, un.tokens)  # same random codes, different declared q
    x = oh.tokens[0, :, 0]
    assert torch.equal(oh.q[0, :, 0], torch.nn.functional.one_hot(x, 16).float())
    assert torch.allclose(un.q[0, :, 0], torch.full((3, 16), 1 / 16))
    # the decision: target p(x) = 0.2 and u = 0.5 -> one-hot: rejected (0.5 * 1 > 0.2), uniform: accepted
    p = torch.full((1, 16), 0.8 / 15)
    p[0, x[0]] = 0.2
    u = torch.tensor([0.5])
    acc_oh, r_oh = exact_try(p, x[:1], oh.q[0, :1, 0], u)
    acc_un, _ = exact_try(p, x[:1], un.q[0, :1, 0], u)
    assert not acc_oh.item() and acc_un.item()
    # one-hot residual = the target with the draft zeroed, as for a point mass
    assert torch.allclose(r_oh, exact_try(p, x[:1], None, u)[1])
    with pytest.raises(ValueError, match="decoder.proposer.init_q"):
        JacobiProposer(init_q="flat")
