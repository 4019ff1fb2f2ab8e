"""Hawk + SJD-PAC (``decoder=hawk_pac``, ours, :mod:`hawkspec.decoding.proposers.hawk_pac`): lossless on the
enumerable model with heads that differ from the target (one prompt, and two prompts in one batch; each variant);
every sibling is a draw from the q the pool hands the exact rule for it (empirically, over many rows); greedy
equals AR; with SJD-PAC's fresh drafts and siblings it is SJD-PAC token for token; the preset builds, decodes and
takes the model's tree."""

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import HorizontalSource, PACProposer, VerticalSource
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.proposers.hawk_pac import HawkPACProposer
from hawkspec.decoding.proposers.pac import pac_paths
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import EAGER, ExecutionMode
from hawkspec.metrics.lossless import chi_square, image_distribution
from hawkspec.testing import compose, random_heads, the_decoder

PROMPTS = ["a red circle", "a blue square"]
SAMPLING = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
N_SAMPLES = 3000
ALPHA = 1e-3


@pytest.fixture(scope="module")
def setup():
    """test_sjd_pac.py's enumerable model (2x3 grid of 4 codes, peaky, CFG and top-k on) and random heads far
    from it (3 horizontal, 1 vertical)."""
    from hawkspec.testing import build_random_backbone, peaky

    bb = peaky(build_random_backbone(rows=2, cols=3, num_codes=4, seed=1), scale=0.3, seed=0)
    heads = random_heads(bb, scale=0.3, seed=3, num_horizontal=3, vertical=True, vsd=1)
    return bb, heads, [image_distribution(bb, prompt, SAMPLING) for prompt in PROMPTS]


def proposer(drafter, nodes=16, width=3, depth=3, **keys):
    return proposer_from_config("hawk_pac", {"horizontal": drafter, "vertical": drafter}, nodes=nodes, width=width,
                                depth=depth, **keys)


def hawk_pac(bb, drafter, nodes=16, width=3, depth=3, rule=None, s=SAMPLING, mode=EAGER, **keys):
    return SpeculativeDecoder(bb, proposer(drafter, nodes, width, depth, **keys), rule or ExactAcceptance(), s,
                              pac_paths(nodes, width, depth), mode=mode)


# --------------------------------------------------------------------------------------------- lossless
VARIANTS = [
    (16, 3, 3, {}),  # the preset: fresh and siblings from the heads
    (10, 3, 2, {}),
    (16, 3, 3, {"siblings_from": "stale"}),  # fresh positions only
    (16, 3, 3, {"fresh": "uniform"}),  # siblings only
    (16, 3, 3, {"redraft": 2, "heads": ["horizontal", "vertical"]}),
]


@pytest.mark.parametrize("nodes, width, depth, keys", VARIANTS)
def test_hawk_pac_is_lossless(setup, nodes, width, depth, keys):
    bb, heads, [(grids, probs), _] = setup
    out = hawk_pac(bb, heads, nodes, width, depth, **keys).generate([PROMPTS[0]] * N_SAMPLES,
                                                                    torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 1  # the drafts are really exercised
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


def test_hawk_pac_is_lossless_in_a_mixed_batch(setup):
    """Two prompts alternating in one batch: rows advance by different amounts (per-row commits, continuations,
    vertical caches and fresh drafts); each prompt's images follow its own distribution."""
    bb, heads, dists = setup
    codes = hawk_pac(bb, heads).generate(PROMPTS * (N_SAMPLES // 2), torch.Generator().manual_seed(321)).codes
    codes = codes.flatten(1)
    for i, (grids, probs) in enumerate(dists):
        assert chi_square(codes[i::2], grids, probs) > ALPHA, PROMPTS[i]


@pytest.mark.slow  # compiling the step takes a minute or more on 2 shared cores
def test_hawk_pac_is_lossless_compiled(setup):
    """``eval.compile=step``: static draws and shapes (the vertical cache one slot per target position, one block of Gumbel noise
    per step), the step compiles as one graph, and the exact rule stays lossless."""
    bb, heads, [(grids, probs), _] = setup
    dec = hawk_pac(bb, heads, mode=ExecutionMode("step"))
    out = dec.generate([PROMPTS[0]] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


def test_greedy_hawk_pac_equals_greedy_ar():
    from hawkspec.testing import random_backbone

    bb = random_backbone("tiny", rows=4, cols=5, num_codes=32, seed=0)
    heads = random_heads(bb, scale=0.05, seed=1, num_horizontal=3, vertical=True, vsd=2)
    g = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    prompts = ["a large red circle in the center", "a small blue square on the left"]
    ref = ar_generate(bb, prompts, g).tokens
    for rule in (GreedyAcceptance(), ExactAcceptance()):
        out = hawk_pac(bb, heads, 16, 3, 3, rule, g).generate(prompts, torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, ref), type(rule).__name__
        assert out.forwards < ref.shape[1]


def test_with_sjd_pacs_fresh_drafts_and_siblings_it_is_sjd_pac():
    """fresh: uniform, siblings_from: stale, horizontal heads only (no vertical cache drawing): the same random stream
    and the same drafts as SJD-PAC, so the same images token for token."""
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=3, cols=4, num_codes=16, seed=2)
    heads = random_heads(bb, scale=0.1, seed=1, num_horizontal=3, vertical=True, vsd=1)
    s = SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    prop = HawkPACProposer({"horizontal": HorizontalSource(heads, draft="sample")}, 12, 3, 2, fresh="uniform",
                           siblings_from="stale")
    ours = SpeculativeDecoder(bb, prop, ExactAcceptance(), s, pac_paths(12, 3, 2))
    theirs = SpeculativeDecoder(bb, PACProposer(12, 3, 2), ExactAcceptance(), s, pac_paths(12, 3, 2))
    a = ours.generate(PROMPTS * 3, torch.Generator().manual_seed(7))
    b = theirs.generate(PROMPTS * 3, torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and a.forwards == b.forwards


# --------------------------------------------------------------------------------------------- the siblings' q
def _pools_after(dec, prompts, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        batch, state = dec.start(prompts, torch.Generator().manual_seed(0))
        for _ in range(steps):
            dec.step(batch, state, gen)
        at = dec.locate(batch, state)
        return (state, at), dec.propose(state, at, gen)


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_every_sibling_is_a_draw_from_its_pool_q(steps):
    """Over 4,000 rows (one prompt, rows diverging after the first step): at every code depth and rank, the
    drafted codes' counts match the sum over rows of the pool's q for that rank (given the ranks before it), and
    rank b's q has no mass on ranks 0..b-1. Step 0: every position fresh (horizontal heads' q, uniform beyond);
    later steps: carried positions (p_stale's rank 0, the heads' siblings), the vertical cache's q, fresh tails."""
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=3, cols=4, num_codes=6, seed=2)
    heads = random_heads(bb, scale=0.3, seed=1, num_horizontal=2, vertical=True, vsd=1)
    s = SamplingConfig(temperature=1.0, top_k=5, cfg_scale=2.0)
    dec = hawk_pac(bb, heads, 10, 3, 2, s=s)
    n = 4000
    _, pools = _pools_after(dec, ["a red circle"] * n, steps, seed=11)
    tok, q = pools.tokens, pools.q.double()  # (n, J, P), (n, J, P, V)
    J, V = tok.shape[1], q.shape[-1]
    checked = 0
    for j in range(J):
        for b in range(3):
            live = tok[:, j, b] >= 0
            if live.sum() < 500:
                continue
            t, qb = tok[live, j, b], q[live, j, b]
            assert torch.allclose(qb.sum(-1), torch.ones_like(qb.sum(-1)), atol=1e-5)
            earlier = tok[live, j, :b]
            if b:
                assert (qb.gather(-1, earlier.clamp(min=0)) * (earlier >= 0)).abs().max() < 1e-6
            counts = torch.bincount(t, minlength=V).double()
            expected = qb.sum(0)
            stat = float(((counts - expected) ** 2 / expected.clamp_min(1e-9))[expected > 5].sum())
            dof = int((expected > 5).sum()) - 1
            assert stat < dof + 6 * (2 * max(dof, 1)) ** 0.5 + 10, (steps, j, b, stat, dof)
            checked += 1
    assert checked >= 6


def test_fresh_positions_take_the_heads_q_and_record_it():
    """Before the first forward no position has been predicted: the depths the horizontal heads reach are drafted
    from their q (the target's sampling applied), recorded as the positions' q; beyond them uniform."""
    from hawkspec.decoding.sampling import target_probs
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=3, cols=4, num_codes=16, seed=2)
    heads = random_heads(bb, scale=0.3, seed=1, num_horizontal=2, vertical=True, vsd=1)
    s = SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    dec = hawk_pac(bb, heads, 10, 3, 2, s=s)
    (state, at), pools = _pools_after(dec, ["a red circle"], 0, seed=1)
    prop = dec.proposer
    pos = at.root_pos[0] + dec.code_offset[at.topo][0]
    want = target_probs(heads.horizontal(state.hidden), s)[0]  # (2, V)
    for j in range(2):  # heads 1, 2
        k = int(pos[j] - at.root_pos[0])
        assert torch.allclose(prop.q[0, pos[j]], want[k - 1], atol=1e-6)
        assert torch.allclose(pools.q[0, j, 0], want[k - 1], atol=1e-6)
        assert ((want[k - 1] > 0)[pools.tokens[0, j]]).all()  # within the heads' top-k
    assert torch.allclose(pools.q[0, -1, 0], torch.full((16,), 1 / 16))  # past the heads: uniform


# --------------------------------------------------------------------------------------------- presets and config
def test_preset_takes_the_models_tree_and_the_hawk_heads():
    from hawkspec.cli.common import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for backbone in ("tiny", "lumina_mgpt_768"):
            cfg = compose("eval", overrides=[f"backbone={backbone}", "paths.root_dir=/r", "decoder=hawk_pac"])
            dec = OmegaConf.to_container(the_decoder(cfg), resolve=True)
            tuning = OmegaConf.to_container(cfg.backbone.tuning.pac, resolve=True)
            assert dec["tree"]["pac"] == tuning, backbone
            assert {k: dec["proposer"][k] for k in ("nodes", "width", "depth")} == tuning
            assert dec["acceptance"]["_target_"].endswith("ExactAcceptance")
            src = dec["proposer"]["sources"]
            assert src["horizontal"]["path"] == src["vertical"]["path"] == dec["heads_path"]
            assert dec["heads_path"].endswith("/hawk")
            assert {s["draft"] for s in src.values()} == {"sample"}


def test_preset_builds_decodes_and_describes_itself(tmp_path):
    from hawkspec.cli.common import CONF_DIR
    from hawkspec.decoding.build import build_decoder
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)
    random_heads(bb, scale=0.05, seed=0, num_horizontal=3, vertical=True, vsd=2).save(tmp_path / "hawk")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["decoder=hawk_pac", "decoder.tree.pac.nodes=16",
                                         f"paths.heads_dir={tmp_path}"])
    dec = build_decoder(the_decoder(cfg), bb, SamplingConfig(temperature=1.0, top_k=16, cfg_scale=2.0))
    assert dec.lossless and dec.table.num_nodes >= 16
    prop = dec.proposer
    assert isinstance(prop, HawkPACProposer) and prop.horizontal.heads is prop.vertical.heads  # one load
    out = dec.generate(PROMPTS, torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 4) and (out.codes >= 0).all() and (out.codes < 64).all()
    desc = dec.describe()
    assert desc["name"] == "hawk_pac"
    assert {k: desc["proposer"][k] for k in ("name", "nodes", "width", "depth", "fresh", "siblings_from", "redraft")} == \
        {"name": "hawk_pac", "nodes": 16, "width": 3, "depth": 3, "fresh": "heads", "siblings_from": "heads", "redraft": 0}
    assert {"tok", "q", "vertical.ring_q", "vertical.ring_tok"} <= set(prop.state())


def test_refusals(setup):
    bb, heads, _ = setup
    with pytest.raises(ValueError, match="draft must be `sample`"):
        HawkPACProposer({"horizontal": HorizontalSource(heads, draft="topk")}, 10, 3, 2)
    with pytest.raises(ValueError, match="siblings_from"):
        HawkPACProposer({"vertical": VerticalSource(heads, draft="sample")}, 10, 3, 2, siblings_from="mixed")
    with pytest.raises(ValueError, match="redraft"):
        HawkPACProposer({"vertical": VerticalSource(heads, draft="sample")}, 10, 3, 2, redraft=-1)
    with pytest.raises(ValueError, match="sources"):
        HawkPACProposer({}, 10, 3, 2)
