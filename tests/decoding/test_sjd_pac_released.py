"""SJD-PAC as released (``decoder=sjd_pac_released``: :class:`~hawkspec.decoding.acceptance.PACReleasedAcceptance`
and the pac proposer's ``siblings: residual``), lossy, next to our exact ``sjd_pac``.

(a) End to end on test_lossless.py's kind of enumerable model (``testing.peaky`` on a tiny random backbone, one
prompt, the chi-square of whole images): with a tree the image cannot truncate (1 x 4 image, L 7, K 2, D 3) the
released sampler fails by far, mostly through its uniform code after a main row accepted to its end; with a tree
always truncated by the image's end (L 9), so that only the three departures of BRIEF-2026 §2.4 act, it still
fails (p ~ 4e-6 at 3000 images), while ``sjd_pac`` passes on the same model. The three departures' end-to-end
effect is near the detection limit of a few thousand images on most tiny models (on test_sjd_pac.py's 2 x 3 model,
K 3 of top-3 codes, it is not seen at 3000 images), so (b) shows each one on a constructed case against its exact
counterpart, with the released distribution worked out by enumeration: the path choice (the longest row instead of
the first accepted sibling), the last-sibling residual, residual-sampled siblings. (c) The preset.
"""

import itertools

import pytest
import torch
from hydra import initialize_config_dir
from scipy.stats import chisquare

from hawkspec.decoding.acceptance import ExactAcceptance, PACReleasedAcceptance
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import PACProposer
from hawkspec.decoding.proposers.base import Pools
from hawkspec.decoding.proposers.pac import pac_paths, residual_continuation
from hawkspec.decoding.sampling import SamplingConfig, sample
from hawkspec.decoding.state import Tree
from hawkspec.decoding.walks import TriesWalk, walk_longest_row
from hawkspec.metrics.lossless import chi_square, image_distribution
from hawkspec.testing import build_random_backbone, compose, peaky, the_decoder

ALPHA = 1e-3  # test_sjd_pac.py's: a lossless decoder passes with p > ALPHA; the released one fails with p < ALPHA
SAMPLING = SamplingConfig(temperature=1.0, top_k=0, cfg_scale=2.0)
N_IMAGES = 3000
N_DRAWS = 200_000


def decoder(bb, nodes, released: bool):
    rule = PACReleasedAcceptance() if released else ExactAcceptance()
    siblings = "residual" if released else "without_replacement"
    return SpeculativeDecoder(bb, PACProposer(nodes, 2, 3, siblings=siblings), rule, SAMPLING, pac_paths(nodes, 2, 3))


def p_value(counts, expected):
    counts, expected = torch.as_tensor(counts, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a draw the distribution cannot produce"
    expected = expected[keep] / expected[keep].sum()
    return float(chisquare(counts[keep].numpy(), (expected * counts.sum()).numpy()).pvalue)


# --------------------------------------------------------------------------------------------- (a) end to end
@pytest.mark.parametrize("scale, nodes", [(0.3, 7), (0.6, 9)], ids=["full-rows", "truncated-tree"])
def test_released_fails_the_chi_square_where_sjd_pac_passes(scale, nodes):
    bb = peaky(build_random_backbone(rows=1, cols=4, num_codes=4, seed=1), scale=scale, seed=0)
    grids, probs = image_distribution(bb, "a red circle", SAMPLING)
    gen = torch.Generator().manual_seed(123)
    released = decoder(bb, nodes, True).generate(["a red circle"] * N_IMAGES, gen)
    assert released.accepted_tokens.float().mean() > 1  # the tree is really exercised
    assert chi_square(released.codes.flatten(1), grids, probs) < ALPHA
    if nodes == 7:  # one exact run on the same model (test_sjd_pac.py has more)
        ours = decoder(bb, nodes, False).generate(["a red circle"] * N_IMAGES, torch.Generator().manual_seed(123))
        assert chi_square(ours.codes.flatten(1), grids, probs) > ALPHA


# --------------------------------------------------------------------------------------------- (b) each departure
P1 = [0.3, 0.3, 0.2, 0.2]  # test_sjd_pac.py's constructed depth-2 case (K 2)
Q1 = [0.25, 0.25, 0.25, 0.25]
Q2 = [0.7, 0.1, 0.1, 0.1]
P2 = [[0.05, 0.45, 0.45, 0.05], [0.9, 0.04, 0.03, 0.03], [0.8, 0.1, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1]]


def without_replacement(q: torch.Tensor, k: int, gen) -> torch.Tensor:
    """(N, V) -> (N, k) ordered draws without replacement (Gumbel-top-k)."""
    g = q.log() - (-torch.rand(q.shape, generator=gen).clamp_min(1e-30).log()).log()
    return g.topk(k, dim=-1).indices


def less(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    q = q.scatter(-1, x.unsqueeze(-1), 0.0)
    return q / q.sum(-1, keepdim=True)


def test_path_choice_longest_row_is_biased_and_first_accepted_sibling_is_exact():
    """Departure (1), through the engine's walks on the depth-2 tree of test_sjd_pac.py (K 2: nodes (0) (1) (0,0)
    (0,1) (1,0) (1,1)): the first committed code of :func:`walk_longest_row` follows the released enumeration
    (``first_token(released=True)``, off the target by TV 0.018) and fails against the target; the exact walk
    (:class:`~hawkspec.decoding.walks.TriesWalk`, first accepted sibling) on the same drafts and uniforms passes."""
    bb = build_random_backbone(rows=4, cols=8, num_codes=4, seed=0)
    dec = SpeculativeDecoder(bb, PACProposer(7, 2, 3), ExactAcceptance(), SAMPLING, pac_paths(7, 2, 3))
    tab, N, V = dec.table, N_DRAWS, 4
    topo = tab.lookup(torch.zeros(N, dtype=torch.long))
    T = tab.num_nodes  # padded: other topologies splice end-of-line nodes in
    assert tab.valid[topo[0]].sum() == 7 and tab.depth[topo[0], :7].tolist() == [0, 1, 1, 2, 2, 2, 2]
    gen = torch.Generator().manual_seed(0)
    q1, q2, p2 = torch.tensor(Q1).expand(N, V), torch.tensor(Q2).expand(N, V), torch.tensor(P2)
    a, b = without_replacement(q1, 2, gen), without_replacement(q2, 2, gen)
    tokens = torch.stack([a, b], dim=1)  # (N, J, P)
    pool_q = torch.stack([torch.stack([q1, less(q1, a[:, 0])], 1), torch.stack([q2, less(q2, b[:, 0])], 1)], 1)
    pools = Pools(tokens, pool_q)
    slot = tab.code_depth[topo] * 2 + tab.rank[topo]
    cand = tokens.flatten(1).gather(1, slot)
    cand[:, 0] = 0
    p = torch.full((N, T, V), 1.0 / V)
    p[:, 0], p[:, 1], p[:, 2] = torch.tensor(P1), p2[a[:, 0]], p2[a[:, 1]]
    q = pool_q.flatten(1, 2).gather(1, slot[..., None].expand(-1, -1, V))
    forced, ok, active = tab.forced[topo], tab.valid[topo], torch.ones(N, dtype=torch.bool)
    firsts = {}
    for name in ("released", "exact"):
        g = torch.Generator().manual_seed(1)
        if name == "released":
            cur, path, n_path, r = walk_longest_row(PACReleasedAcceptance(), p, cand, q, forced, ok, tab.children[topo],
                                                    tab.mask[topo], tab.depth[topo], active, dec.path_width, None, g)
            bonus = sample(r, g)
        else:  # the exact rule's walk as the engine calls it: one signature, the bonus drawn from the last residual
            tree = Tree(pools=pools, depth=tab.depth[topo], code_depth=tab.code_depth[topo], rank=tab.rank[topo],
                        forced=forced, anc=tab.mask[topo], parent=tab.parent[topo], children=tab.children[topo],
                        slot=slot, cand=cand, node_ok=ok, node_tok=cand, mask=tab.mask[topo])
            v = TriesWalk(ExactAcceptance(), tab, dec.path_width, static=False)(tree, p, active, g)
            path, n_path, bonus = v.path, v.n_path, v.bonus
        firsts[name] = torch.where(n_path > 1, cand.gather(1, path[:, 1:2]).squeeze(1), bonus)
    counts = {k: torch.bincount(v, minlength=V) for k, v in firsts.items()}
    released = first_token(P1, P2, Q1, Q2, 2, released=True)
    assert p_value(counts["released"], released) > ALPHA
    assert p_value(counts["released"], P1) < ALPHA
    assert p_value(counts["exact"], P1) > ALPHA


def _wor(q, k):
    """Every ordered k-tuple drawn without replacement from q, with its probability."""
    for tup in itertools.permutations(range(len(q)), k):
        w, left = 1.0, list(q)
        for x in tup:
            w *= left[x] / sum(left)
            left[x] = 0.0
        if w > 0:
            yield tup, w


def _rrs(p, q, tup):
    """Per-sibling acceptance probabilities of RRS against p, siblings ``tup`` drawn without replacement from q."""
    r, qb, acc = list(p), list(q), []
    for x in tup:
        qn = _norm(qb)
        acc.append(min(1.0, r[x] / qn[x]))
        res = [max(a - b, 0.0) for a, b in zip(r, qn)]
        r = _norm(res) if sum(res) > 0 else r
        qb[x] = 0.0
    return acc, r


def first_token(p1, p2, q1, q2, K, released: bool) -> list[float]:
    """P(first committed code) of a depth-2 SJD-PAC tree by exact enumeration of the drafts and of every node's
    decision (test_sjd_pac.py's): ``released``, the longest accepted row (lowest on ties); else the first accepted
    sibling."""
    V = len(p1)
    out = [0.0] * V
    for a, wa in _wor(q1, K):
        acc1, r1 = _rrs(p1, q1, a)
        for b, wb in _wor(q2, K):
            acc2 = [_rrs(p2[x], q2, b)[0] for x in a]
            probs = acc1 + [v for row in acc2 for v in row]
            for bits in itertools.product((0, 1), repeat=len(probs)):
                w = wa * wb
                for bit, pr in zip(bits, probs):
                    w *= pr if bit else 1 - pr
                if w == 0:
                    continue
                top, deep = bits[:K], bits[K:]
                if released:
                    lens = [0 if not top[i] else 1 + deep[i * K + j] for i in range(K) for j in range(K)]
                    pick = None if max(lens) == 0 else a[lens.index(max(lens)) // K]
                else:
                    pick = next((a[i] for i in range(K) if top[i]), None)
                for x in range(V):
                    out[x] += w * (r1[x] if pick is None else float(x == pick))
    return out


def _norm(v):
    s = sum(v)
    return [x / s for x in v]


def _released_ranks(p, q, K, kids):
    """P(new rank 0) and P(new ranks 0, 1) of the released continuation, by enumeration of the old ranks (drawn
    without replacement from q), the keep test and the residual draws."""
    V = len(p)
    r0, pair = [0.0] * V, {}
    for old, w in _wor(q, K):
        d = old[0]
        keep = min(1.0, p[d] / q[d])
        if kids > 1:  # RRS through every old rank: the residual after the last sibling
            r, qb = list(p), list(q)
            for x in old:
                r = _norm([max(a - b, 0.0) for a, b in zip(r, _norm(qb))])
                qb[x] = 0.0
            rej = r
        else:
            rej = _norm([max(a - b, 0.0) for a, b in zip(p, q)])
        own = _norm([max(a - b, 0.0) for a, b in zip(p, q)])
        r0[d] += w * keep
        for y in range(V):
            pair[(d, y)] = pair.get((d, y), 0.0) + w * keep * own[y]
        for (x, y), v in _wor(rej, 2):
            pair[(x, y)] = pair.get((x, y), 0.0) + w * (1 - keep) * v
            r0[x] += w * (1 - keep) * v
        for x in range(V):  # a residual with one code: rank 0 only
            if rej[x] == 1.0:
                r0[x] += w * (1 - keep)
    return r0, pair


def _continue(p, q, K, kids, seed):
    N = N_DRAWS
    gen = torch.Generator().manual_seed(seed)
    pt, qt = torch.tensor(p).expand(N, -1).contiguous(), torch.tensor(q).expand(N, -1).contiguous()
    old = without_replacement(qt, K, gen)
    return residual_continuation(pt, qt, old, torch.full((N,), kids), gen)


def test_last_sibling_residual_is_biased_and_the_nodes_own_residual_is_exact():
    """Departure (2): a carried rank 0 whose keep test fails, resampled inside the tree (the predicting node has K
    children) from the residual after the LAST sibling, is not a draw from p_stale -- the q it is recorded with; on
    the chain (one child) the node's own residual makes it one (the keep-or-resample coupling)."""
    p, q, K = [0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4], 2
    inside = torch.bincount(_continue(p, q, K, K, 0)[:, 0], minlength=4)
    chain = torch.bincount(_continue(p, q, K, 1, 1)[:, 0], minlength=4)
    assert p_value(inside, _released_ranks(p, q, K, K)[0]) > ALPHA  # the released code's own distribution
    assert p_value(inside, p) < ALPHA
    assert p_value(chain, p) > ALPHA


def test_residual_siblings_are_not_drawn_without_replacement_from_the_recorded_q():
    """Departure (3): the next tree's rank 1 is a residual draw, while the test (exact or released) takes it for a
    draw from the recorded q (p_stale) less rank 0: the pair (rank 0, rank 1) follows the released enumeration and
    fails against p(x) p(y) / (1 - p(x)), which ours (sjd_pac: Gumbel-top-1 of p_stale without rank 0) draws."""
    p, q, K = [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], 2
    ranks = _continue(p, q, K, 1, 2)
    assert (ranks >= 0).all()
    cells = [(x, y) for x in range(4) for y in range(4)]
    key = ranks[:, 0] * 4 + ranks[:, 1]
    counts = torch.bincount(key, minlength=16)
    released = _released_ranks(p, q, K, 1)[1]
    exact = [0.0 if x == y else p[x] * p[y] / (1 - p[x]) for x, y in cells]
    assert p_value(counts, [released.get(c, 0.0) for c in cells]) > ALPHA
    with pytest.raises(AssertionError, match="cannot produce"):  # rank 1 may repeat rank 0: impossible without replacement
        p_value(counts, exact)
    distinct = torch.tensor([x != y for x, y in cells])
    assert p_value(counts[distinct], torch.tensor(exact)[distinct]) < ALPHA  # and off even among distinct pairs


# --------------------------------------------------------------------------------------------- (c) the preset
def test_preset_builds_decodes_at_batch_2_and_says_it_is_lossy():
    from hawkspec.cli.common import CONF_DIR
    from hawkspec.decoding.build import build_decoder

    bb = build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["decoder=sjd_pac_released", "decoder.tree.pac.nodes=16"])
    dec = build_decoder(the_decoder(cfg), bb, SamplingConfig(temperature=1.0, top_k=16, cfg_scale=2.0))
    assert not dec.lossless and dec.table.num_nodes >= 16
    out = dec.generate(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 4) and (out.codes >= 0).all() and (out.codes < 64).all()
    desc = dec.describe()
    assert desc["name"] == "sjd_pac_released" and desc["lossless"] is False
    assert desc["proposer"] == {"name": "pac", "nodes": 16, "width": 3, "depth": 3, "init_q": "uniform",
                                "siblings": "residual"}
    assert desc["acceptance"] == {"name": "pac_released", "lossless": False, "walk": "longest_row",
                                  "full_row_bonus": "uniform"}
