"""SJD-PAC, exact (``decoder=sjd_pac``, :mod:`hawkspec.decoding.proposers.pac`): the tree's rank paths worked out
by hand; lossless on the enumerable model (one prompt, and two prompts in one batch); each sibling's q; greedy
equals AR; the released code's path choice (the longest accepted row instead of the first accepted sibling)
shown biased by exact enumeration of a constructed case; the preset takes the model's L, K, D."""

import itertools

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.backbones.base import ImageGrid
from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import PACProposer
from hawkspec.decoding.proposers.pac import pac_paths, pac_tree_sizes
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import EAGER, ExecutionMode
from hawkspec.metrics.lossless import chi_square, image_distribution
from hawkspec.testing import compose, the_decoder

PROMPTS = ["a red circle", "a blue square"]
SAMPLING = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
N_SAMPLES = 3000
ALPHA = 1e-3


@pytest.fixture(scope="module")
def setup():
    """test_lossless.py's enumerable model: a 2x3 grid of 4 codes, peaky and prompt-dependent, CFG and top-k on."""
    from hawkspec.testing import build_random_backbone, peaky

    bb = peaky(build_random_backbone(rows=2, cols=3, num_codes=4, seed=1), scale=0.3, seed=0)
    return bb, [image_distribution(bb, prompt, SAMPLING) for prompt in PROMPTS]


def pac(bb, nodes=10, width=3, depth=2, rule=None, s=SAMPLING, mode=EAGER):
    return SpeculativeDecoder(bb, PACProposer(nodes, width, depth), rule or ExactAcceptance(), s,
                              pac_paths(nodes, width, depth), mode=mode)


# --------------------------------------------------------------------------------------------- the tree
def test_pac_tree_by_hand():
    """K = 3, D = 3, L = 16: a 3-ary part of 1 + 3 + 9 = 13 nodes (depths 0..2) and 3 chain nodes continuing the
    rank-0 branch (depths 3..5): main path 6 nodes, 15 rank paths besides the root."""
    assert pac_tree_sizes(16, 3, 3) == (13, 6)
    assert pac_paths(16, 3, 3) == [
        (0,), (1,), (2,),
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2),
        (0, 0, 0),
        (0, 0, 0, 0),
        (0, 0, 0, 0, 0),
    ]
    # the code's defaults: 63 paths, main path 54 nodes (BRIEF §2.1), 9 root-to-leaf rows
    paths = pac_paths(64, 3, 3)
    assert len(paths) == 63 and max(map(len, paths)) == 53 and pac_tree_sizes(64, 3, 3) == (13, 54)
    leaves = [p for p in paths if not any(q[:-1] == p for q in paths)]
    assert len(leaves) == 9
    assert pac_tree_sizes(64, 4, 3) == (21, 46)
    assert pac_paths(5, 3, 1) == [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]  # D = 1: SJD's chain
    with pytest.raises(ValueError, match="decoder.tree.pac"):
        pac_paths(8, 3, 3)  # the 3-ary part alone has 13 nodes


def test_tree_in_the_engine_has_the_same_k_children_everywhere_in_the_k_ary_part():
    from hawkspec.decoding.tree import TopologyTable

    tab = TopologyTable(pac_paths(16, 3, 3), ImageGrid(rows=8, cols=8, eol=False))
    t = tab.topologies[tab.lookup(torch.tensor([0])).item()]
    assert t.size == 16
    with_kids = {d: 0 for d in range(6)}
    for node in range(t.size):
        kids = [int(c) for c in t.children[node] if c >= 0]
        d = int(t.depth[node])
        if d < 2:  # the 3-ary part: ranks 0, 1, 2 under every node
            assert [int(t.rank[c]) for c in kids] == [0, 1, 2]
        elif kids:  # the chain: rank 0 only, under the rank-0 branch
            assert [int(t.rank[c]) for c in kids] == [0] and int(t.rank[node]) == 0
        with_kids[d] += bool(kids)
        assert all(int(t.code_depth[c]) == d for c in kids)
    assert with_kids == {0: 1, 1: 3, 2: 1, 3: 1, 4: 1, 5: 0}


# --------------------------------------------------------------------------------------------- lossless
@pytest.mark.parametrize("nodes, width, depth", [(10, 3, 2), (16, 3, 3)])
def test_sjd_pac_is_lossless(setup, nodes, width, depth):
    bb, [(grids, probs), _] = setup
    out = pac(bb, nodes, width, depth).generate([PROMPTS[0]] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 1  # the drafts are really exercised
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


@pytest.mark.slow  # compiling the step takes a minute or more on 2 shared cores
def test_sjd_pac_is_lossless_compiled(setup):
    """``eval.compile=step``: the tree is static, the siblings' draws (Gumbel-top-K without replacement) and the
    continuation's uniforms come from one block of noise per step, the step compiles as one graph, and the exact
    rule stays lossless, in a mixed batch too."""
    bb, dists = setup
    dec = pac(bb, 16, 3, 3, mode=ExecutionMode("step"))
    codes = dec.generate(PROMPTS * (N_SAMPLES // 2), torch.Generator().manual_seed(321)).codes.flatten(1)
    for i, (grids, probs) in enumerate(dists):
        assert chi_square(codes[i::2], grids, probs) > ALPHA, PROMPTS[i]


def test_sjd_pac_is_lossless_in_a_mixed_batch(setup):
    """Two prompts alternating in one batch: rows advance by different amounts (per-row commits, continuations
    and fresh drafts); each prompt's images follow its own distribution."""
    bb, dists = setup
    codes = pac(bb, 16, 3, 3).generate(PROMPTS * (N_SAMPLES // 2), torch.Generator().manual_seed(321)).codes
    codes = codes.flatten(1)
    for i, (grids, probs) in enumerate(dists):
        assert chi_square(codes[i::2], grids, probs) > ALPHA, PROMPTS[i]


def test_greedy_sjd_pac_equals_greedy_ar():
    from hawkspec.testing import random_backbone

    bb = random_backbone("tiny", rows=4, cols=5, num_codes=32, seed=0)
    g = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    prompts = ["a large red circle in the center", "a small blue square on the left"]
    ref = ar_generate(bb, prompts, g).tokens
    for rule in (GreedyAcceptance(), ExactAcceptance()):
        out = pac(bb, 16, 3, 3, rule, g).generate(prompts, torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, ref), type(rule).__name__
        assert out.forwards < ref.shape[1]


def test_siblings_are_distinct_and_continue_from_the_forward():
    """After a step, every carried position holds K distinct codes and the forward's output as its q; rank b's pool
    q is that q with ranks 0..b-1 zeroed and renormalised."""
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=3, cols=4, num_codes=16, seed=2)
    dec = pac(bb, 10, 3, 2, s=SamplingConfig(temperature=1.0, top_k=0, cfg_scale=2.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        batch, state = dec.start(["a red circle"], torch.Generator().manual_seed(0))
        dec.step(batch, state, gen)
        at = dec.locate(batch, state)
        pools = dec.propose(state, at, gen)
    prop = dec.proposer
    pos = at.root_pos[0] + dec.code_offset[at.topo][0]  # (J,) body position of each code depth
    tok = pools.tokens[0]  # (J, P)
    live = tok[:, 0] >= 0
    assert live.sum() >= 2
    for j in torch.nonzero(live).flatten().tolist():
        ranks = tok[j].tolist()
        assert len(set(ranks)) == 3
        q = prop.q[0, pos[j]]
        assert abs(float(q.sum()) - 1) < 1e-5
        for b in range(3):
            want = q.clone()
            want[ranks[:b]] = 0
            assert torch.allclose(pools.q[0, j, b], want / want.sum(), atol=1e-6)


# --------------------------------------------------------------------------------------------- the released path choice
def _wor(q, k):
    """Every ordered k-tuple of distinct codes drawn without replacement from q, with its probability."""
    for tup in itertools.permutations(range(len(q)), k):
        w, left = 1.0, list(q)
        for x in tup:
            if sum(left) <= 0:
                w = 0.0
                break
            w *= left[x] / sum(left)
            left[x] = 0.0
        if w > 0:
            yield tup, w


def _rrs(p, q, tup):
    """Per-sibling acceptance probabilities of recursive rejection sampling against target p, siblings ``tup``
    drawn without replacement from q (rank b tested with q less ranks 0..b-1), and the final residual."""
    r, qb, acc = list(p), list(q), []
    for x in tup:
        s = sum(qb)
        qn = [v / s for v in qb]
        acc.append(min(1.0, r[x] / qn[x]))
        res = [max(a - b, 0.0) for a, b in zip(r, qn)]
        r = [v / sum(res) for v in res] if sum(res) > 0 else r
        qb[x] = 0.0
    return acc, r


def first_token(p1, p2, q1, q2, K, released: bool) -> list[float]:
    """P(first committed code) of a depth-2 SJD-PAC tree (K siblings at depths 1 and 2, every depth-1 node the
    same K children), by exact enumeration of the drafts and of every node's accept decision.

    ``released``: the released sampler (``SJDPACSpeculativeSampler``, L175-178): every node tested with its own
    uniform, rows = root-to-leaf paths, the row with the longest accepted prefix wins (the lowest on ties), and
    the first committed code is that row's depth-1 draft (the residual after the last sibling if none).
    Otherwise ours: walk the depths, the first accepted sibling wins."""
    V = len(p1)
    out = [0.0] * V
    for a, wa in _wor(q1, K):
        acc1, r1 = _rrs(p1, q1, a)
        for b, wb in _wor(q2, K):
            acc2 = [_rrs(p2[x], q2, b)[0] for x in a]  # (K, K): child j under parent i
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
                    best = max(lens)
                    pick = None if best == 0 else a[lens.index(best) // K]
                else:
                    pick = next((a[i] for i in range(K) if top[i]), None)
                if pick is None:
                    for x in range(V):
                        out[x] += w * r1[x]
                else:
                    out[pick] += w
    return out


def test_released_path_choice_is_biased_and_first_accepted_sibling_is_exact():
    """A sibling accepted earlier loses to a later one whose child was also accepted: the released code's first
    committed code is off the target (total variation 0.018, by enumeration); the first-accepted walk is exact."""
    p1 = [0.3, 0.3, 0.2, 0.2]
    q1 = [0.25, 0.25, 0.25, 0.25]
    q2 = [0.7, 0.1, 0.1, 0.1]
    # the depth-2 target depends on the depth-1 code: after code 0 the child drafts (mostly code 0) are unlikely
    p2 = [[0.05, 0.45, 0.45, 0.05], [0.9, 0.04, 0.03, 0.03], [0.8, 0.1, 0.05, 0.05], [0.7, 0.1, 0.1, 0.1]]
    ours = first_token(p1, p2, q1, q2, 2, released=False)
    released = first_token(p1, p2, q1, q2, 2, released=True)
    tv = lambda a, b: 0.5 * sum(abs(x - y) for x, y in zip(a, b))  # noqa: E731
    assert abs(sum(ours) - 1) < 1e-9 and abs(sum(released) - 1) < 1e-9
    assert tv(ours, p1) < 1e-9
    assert tv(released, p1) > 0.015
    assert released[0] < p1[0]  # code 0's subtree rarely accepts, so other rows outbid it


# --------------------------------------------------------------------------------------------- presets
def test_preset_takes_the_models_tree():
    from hawkspec.cli.common import CONF_DIR
    from hawkspec.cli.eval import decoder_config

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for backbone in ("lumina_mgpt_768", "lumina_mgpt_512", "lumina_mgpt_1024", "janus_pro_7b", "emu3_gen",
                         "llamagen_xl_256", "llamagen_xl_512", "tiny"):
            cfg = compose("eval", overrides=[f"backbone={backbone}", "decoder=sjd_pac"])
            dec = OmegaConf.to_container(decoder_config(cfg, "sjd_pac"), resolve=True)
            tuning = OmegaConf.to_container(cfg.backbone.tuning.pac, resolve=True)
            assert dec["tree"]["pac"] == tuning, backbone
            if backbone != "tiny":
                assert tuning == {"nodes": 64, "width": 3, "depth": 3}, backbone
            assert {k: dec["proposer"][k] for k in ("nodes", "width", "depth")} == tuning
            assert dec["acceptance"]["_target_"].endswith("ExactAcceptance")


def test_preset_builds_decodes_and_describes_itself():
    from hawkspec.cli.common import CONF_DIR
    from hawkspec.decoding.build import build_decoder
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["decoder=sjd_pac", "decoder.tree.pac.nodes=16"])
    dec = build_decoder(the_decoder(cfg), bb, SamplingConfig(temperature=1.0, top_k=16, cfg_scale=2.0))
    assert dec.lossless and dec.table.num_nodes >= 16
    out = dec.generate(PROMPTS, torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 4) and (out.codes >= 0).all() and (out.codes < 64).all()
    desc = dec.describe()
    assert desc["name"] == "sjd_pac" and desc["proposer"] == {"name": "pac", "nodes": 16, "width": 3, "depth": 3,
                                                              "init_q": "uniform"}


def test_a_proposer_tree_other_than_the_engines_is_refused():
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=3, cols=3, num_codes=16, seed=0)
    dec = SpeculativeDecoder(bb, PACProposer(10, 3, 2), ExactAcceptance(), SAMPLING.__class__(top_k=0),
                             pac_paths(16, 3, 3))
    with pytest.raises(ValueError, match="decoder.tree.pac"):
        dec.generate(["a red circle"], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="codebook"):
        SpeculativeDecoder(bb, PACProposer(64, 20, 2), ExactAcceptance(), SAMPLING.__class__(top_k=0),
                           pac_paths(64, 20, 2))
