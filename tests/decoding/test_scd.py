"""SCD's couplings of the carried Jacobi drafts (``decoder.proposer.coupling: maximal | gumbel``, presets
``scd_maximal`` and ``scd_gumbel``): exact on the enumerable model (one prompt, and two prompts in one batch),
greedy equals AR, the released maximal coupling's stored q shown to bias a constructed two-iteration case that
ours decodes right, the released Gumbel table's plain-AR noise reuse shown to correlate consecutive tokens where
our position-keyed noise does not, and ``coupling: none`` drawing exactly what SJD always drew."""

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.backbones.base import ImageGrid
from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import JacobiProposer
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.proposers.jacobi import JacobiDrafts, gumbel_noise
from hawkspec.decoding.sampling import SamplingConfig, sample
from hawkspec.decoding.static import EAGER, ExecutionMode
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.metrics.lossless import chi_square, image_distribution
from hawkspec.testing import compose, the_decoder

PROMPTS = ["a red circle", "a blue square"]
SAMPLING = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
N_SAMPLES = 3000
ALPHA = 1e-3
COUPLINGS = ["maximal", "gumbel"]


@pytest.fixture(scope="module")
def setup():
    """test_lossless.py's enumerable model: a 2x3 grid of 4 codes, peaky and prompt-dependent, CFG and top-k on."""
    from hawkspec.testing import build_random_backbone, peaky

    bb = peaky(build_random_backbone(rows=2, cols=3, num_codes=4, seed=1), scale=0.3, seed=0)
    return bb, [image_distribution(bb, prompt, SAMPLING) for prompt in PROMPTS]


def scd(bb, coupling, rule=None, s=SAMPLING, window=4, mode=EAGER):
    return SpeculativeDecoder(bb, JacobiProposer(coupling=coupling), rule or ExactAcceptance(), s,
                              paths_from_budget(window, window, 1), mode=mode)


# --------------------------------------------------------------------------------------------- lossless
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_scd_is_lossless(setup, coupling):
    bb, [(grids, probs), _] = setup
    out = scd(bb, coupling).generate([PROMPTS[0]] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 1  # the drafts are really exercised
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_scd_is_lossless_in_a_mixed_batch(setup, coupling):
    """Two prompts alternating in one batch: rows advance by different amounts (per-row commits and carries, and
    per-row Gumbel noise); each prompt's images follow its own distribution."""
    bb, dists = setup
    codes = scd(bb, coupling).generate(PROMPTS * (N_SAMPLES // 2), torch.Generator().manual_seed(321)).codes.flatten(1)
    for i, (grids, probs) in enumerate(dists):
        assert chi_square(codes[i::2], grids, probs) > ALPHA, PROMPTS[i]


@pytest.mark.slow  # a branching tree over 3,000 images: 40-90 s per case on 2 shared cores
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_coupled_jacobi_source_in_hawks_pool_is_lossless(setup, coupling):
    """The coupling as an option of the Jacobi draft source (:class:`JacobiSource`), ahead of Hawk's heads in a
    branching tree (siblings at a position, several nodes predicting one position): still exact."""
    from hawkspec.decoding.proposers import HorizontalSource, JacobiSource, SpatialProposer, VerticalSource
    from hawkspec.heads.draft import DraftHeads, HeadsConfig

    bb, [(grids, probs), _] = setup
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=1), bb)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    prop = SpatialProposer({"jacobi": JacobiSource(coupling=coupling), "vertical": VerticalSource(heads, vsd=1),
                            "horizontal": HorizontalSource(heads)}, order=["jacobi", "vertical", "horizontal"],
                           priority=["vertical", "horizontal"])
    assert prop.describe()["sources"]["jacobi"] == {"kind": "jacobi", "coupling": coupling}
    dec = SpeculativeDecoder(bb, prop, ExactAcceptance(), SAMPLING, paths_from_budget(8, 5, 2))
    out = dec.generate([PROMPTS[0]] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 1
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


@pytest.mark.slow  # compiling the step takes a minute or more on 2 shared cores
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_scd_is_lossless_compiled(setup, coupling):
    """``eval.compile=step``: the couplings' draws are static (two uniforms per node for maximal, two per step
    for the Gumbel seed), the step compiles as one graph, and the exact rule stays lossless."""
    bb, [(grids, probs), _] = setup
    dec = scd(bb, coupling, mode=ExecutionMode("step"))
    out = dec.generate([PROMPTS[0]] * N_SAMPLES, torch.Generator().manual_seed(123))
    assert chi_square(out.codes.flatten(1), grids, probs) > ALPHA


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_greedy_scd_equals_greedy_ar(coupling):
    from hawkspec.testing import random_backbone

    bb = random_backbone("tiny", rows=4, cols=5, num_codes=32, seed=0)
    g = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    prompts = ["a large red circle in the center", "a small blue square on the left"]
    ref = ar_generate(bb, prompts, g).tokens
    for rule in (GreedyAcceptance(), ExactAcceptance()):
        out = scd(bb, coupling, rule, g, window=6).generate(prompts, torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, ref), (coupling, type(rule).__name__)


# --------------------------------------------------------------------------------------------- the drafts alone
def drafts(coupling, B, L=4, K=2):
    d = JacobiDrafts(ImageGrid(rows=1, cols=L, eol=False), K, torch.device("cpu"), coupling)
    d.start(B, torch.device("cpu"))
    return d


def refresh(d, p, pos, generator):
    """One observed forward: nodes at ``pos - 1`` (one per position in ``pos``) with target ``p`` (B, T, K) each,
    nothing committed."""
    B = p.shape[0]
    node_pos = torch.tensor(pos).expand(B, -1) - 1
    d.observe(p, node_pos, torch.full((B, d.L), -1), generator, chain=True)


def out_a(tok, q, p_new):
    """P(the exact rule commits code 0 | draft ``tok`` with stored ``q``, target ``p_new``), per row, for K = 2."""
    acc = torch.minimum(torch.ones(()), p_new[tok] / q.gather(-1, tok[:, None]).squeeze(-1))
    resid = (p_new - q).clamp(min=0)
    resid_a = resid[:, 0] / resid.sum(-1).clamp_min(1e-30)
    return torch.where(tok == 0, acc, (1 - acc) * resid_a)


def two_iterations_exact(q_old, p_stale, p_new, released: bool) -> float:
    """P(code 0 committed) by enumeration: a draft d ~ q_old is carried past a forward giving p_stale at its
    position (not committed), coupled maximally with p_stale, then judged by the exact rule against p_new with the
    q stored for it. ``released``: the released SCD code (lumina1/, janus_pro/) stores q_old for a kept draft;
    ours stores p_stale always."""
    K = len(q_old)
    total = 0.0
    for d in range(K):
        keep = min(1.0, p_stale[d] / q_old[d])
        resid = [max(p_stale[x] - q_old[x], 0.0) for x in range(K)]
        branches = [(d, keep, q_old if released else p_stale)]  # (new draft, probability, stored q)
        branches += [(x, (1 - keep) * resid[x] / sum(resid), p_stale) for x in range(K) if resid[x] > 0]
        for tok, w, q in branches:
            acc = min(1.0, p_new[tok] / q[tok])
            r = [max(p_new[x] - q[x], 0.0) for x in range(K)]
            p0 = acc if tok == 0 else (1 - acc) * (r[0] / sum(r) if sum(r) > 0 else 0.0)
            total += q_old[d] * w * p0
    return total


def test_released_maximal_coupling_is_biased_and_ours_is_exact():
    """BRIEF-2026 §3.3's constructed case: q_old = (.9, .1), p_stale = p_new = (.5, .5). Storing q_old for a kept
    draft (released) commits code 0 with probability 5/18 = 0.278; storing p_stale (ours) with 1/2, the target's."""
    q_old, p_stale = [0.9, 0.1], [0.5, 0.5]
    assert two_iterations_exact(q_old, p_stale, p_stale, released=True) == pytest.approx(5 / 18)
    assert two_iterations_exact(q_old, p_stale, p_stale, released=False) == pytest.approx(0.5)

    # our JacobiDrafts, vectorised over many rows; the released variant is the same draws with q_old kept
    B, g = 200_000, torch.Generator().manual_seed(0)
    d = drafts("maximal", B)
    q_old_t, p = torch.tensor(q_old), torch.tensor(p_stale)
    d.tok[:, 1] = sample(q_old_t.expand(B, 2), g)  # position 1 carries d ~ q_old
    d.q[:, 1] = q_old_t
    old = d.tok[:, 1].clone()
    refresh(d, p.expand(B, 1, 2), [1], g)
    new, q = d.tok[:, 1], d.q[:, 1]
    assert torch.equal(q, p.expand(B, 2))  # stored q: p_stale, kept or not
    kept = new == old  # a rejection's residual has no mass at the old draft
    assert kept.float().mean().item() == pytest.approx(0.6, abs=0.005)  # 1 - TV(q_old, p_stale)
    assert (new == 0).float().mean().item() == pytest.approx(0.5, abs=0.005)  # the new draft ~ p_stale
    ours = out_a(new, q, p).mean().item()
    released = out_a(new, torch.where(kept[:, None], q_old_t, q), p).mean().item()
    assert ours == pytest.approx(0.5, abs=0.005)
    assert released == pytest.approx(5 / 18, abs=0.005)


def test_released_gumbel_table_correlates_plain_ar_tokens_and_ours_does_not():
    """The released GS code keeps its Gumbel noise in a table shifted by each commit, but not in plain-AR steps
    (output_token_num == 1): consecutive AR positions reuse row 0. With p = (.5, .5) at two consecutive positions
    the two tokens then always agree (independent draws agree half the time). Our noise is keyed by the absolute
    position: the two drafts are independent, each ~ p."""
    B, K = 100_000, 2
    g = torch.Generator().manual_seed(1)
    logp = torch.tensor([0.5, 0.5]).log()

    def released_ar_tokens(n_steps):  # one table per run; plain-AR steps never shift it
        table = -torch.log(-torch.log(torch.rand((B, 4, K), generator=g, dtype=torch.float64)))
        return [(logp + table[:, 0]).argmax(-1) for _ in range(n_steps)]

    a, b = released_ar_tokens(2)
    assert (a == b).all()  # perfectly correlated: P(equal) = 1, not 1/2

    d = drafts("gumbel", B)
    refresh(d, torch.full((B, 2, K), 0.5), [1, 2], g)
    a, b = d.tok[:, 1], d.tok[:, 2]
    assert (a == b).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (a == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (b == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_gumbel_drafts_follow_p_and_stay_while_p_does():
    """The coupling itself: Gumbel-max drafts are samples of p (chi-square over rows), a position redrawn from
    the same p keeps its draft, and from a nearby p mostly keeps it; another batch draws another seed."""
    from scipy.stats import chisquare

    B, K = 40_000, 4
    g = torch.Generator().manual_seed(2)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    d = drafts("gumbel", B, K=K)
    refresh(d, p.expand(B, 1, K), [1], g)
    first = d.tok[:, 1].clone()
    counts = torch.bincount(first, minlength=K).double()
    assert counts[3] == 0
    assert chisquare(counts[:3].numpy(), (p[:3].double() * B).numpy()).pvalue > ALPHA
    assert torch.equal(d.q[:, 1], p.expand(B, K))
    seed = d.seed.clone()
    refresh(d, p.expand(B, 1, K), [1], g)
    assert torch.equal(d.tok[:, 1], first) and torch.equal(d.seed, seed)  # the seed is the batch's
    near = torch.tensor([0.45, 0.35, 0.2, 0.0])
    refresh(d, near.expand(B, 1, K), [1], g)
    assert (d.tok[:, 1] == first).float().mean() > 0.9  # 1 - TV = 0.95 for the maximal coupling
    d.start(B, torch.device("cpu"))
    refresh(d, p.expand(B, 1, K), [1], g)
    assert not torch.equal(d.seed, seed) and (d.tok[:, 1] == first).float().mean() < 0.6


def test_gumbel_noise_is_a_function_of_its_key():
    seed = torch.tensor([12345, 678])
    row, pos = torch.arange(3)[:, None], torch.tensor([[5, 6, 7]])
    a = gumbel_noise(seed, row, pos, 8)
    assert a.shape == (3, 3, 8) and a.dtype == torch.float64 and torch.isfinite(a).all()
    assert torch.equal(a, gumbel_noise(seed, row, pos, 8))
    assert torch.equal(a[1, 2], gumbel_noise(seed, torch.tensor(1), torch.tensor(7), 8))  # no dependence on shape
    assert not torch.equal(a, gumbel_noise(torch.tensor([12345, 679]), row, pos, 8))
    assert len(set(a.flatten().tolist())) == a.numel()  # every (row, position, code) its own draw
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6
    big = gumbel_noise(seed, torch.arange(500)[:, None], torch.arange(200)[None], 64)
    assert big.mean().item() == pytest.approx(0.5772, abs=0.01)
    assert big.var().item() == pytest.approx(1.6449, abs=0.02)


# --------------------------------------------------------------------------------------------- coupling: none
def legacy_observe(self, probs, node_pos, codes, generator, chain=False):
    """JacobiDrafts.observe before the coupling option existed (commit 637c8a7), verbatim."""
    from hawkspec.decoding.proposers.base import _earlier

    self.codes = codes
    T = node_pos.shape[1]
    target = node_pos + 1
    ok = (node_pos >= 0) & self._open[target] & (codes.gather(1, target.clamp(max=self.L - 1)) < 0)
    if not chain:
        ok &= ~((target.unsqueeze(-1) == target.unsqueeze(-2)) & ok.unsqueeze(1) & _earlier(T, ok.device)).any(-1)
    slot = torch.where(ok, target, self.L)
    self.tok.scatter_(1, slot, torch.where(ok, sample(probs, generator), -1))
    self.q[self._bidx, slot] = probs


@pytest.mark.parametrize("proposer", ["sjd", "hawk_jacobi"])
def test_coupling_none_draws_exactly_what_sjd_drew(proposer, monkeypatch):
    """``coupling: none`` (the default) makes the same random draws in the same order as before: same codes,
    same step counts and the generator left in the same state, for SJD's proposer and Hawk's Jacobi source."""
    from hawkspec.testing import random_backbone, random_heads

    bb = random_backbone("tiny", rows=4, cols=5, num_codes=32, seed=0)
    s = SamplingConfig(temperature=1.0, top_k=8, cfg_scale=2.0)
    prompts = ["a large red circle in the center", "a small blue square on the left"]
    heads = random_heads(bb)

    def run():
        if proposer == "sjd":
            dec = SpeculativeDecoder(bb, JacobiProposer(coupling="none"), ExactAcceptance(), s,
                                     paths_from_budget(6, 6, 1))
        else:
            hawk = proposer_from_config("hawk_jacobi", {"horizontal": heads, "vertical": heads},
                                        sources__horizontal__draft="sample", sources__vertical__draft="sample")
            dec = SpeculativeDecoder(bb, hawk, ExactAcceptance(), s, paths_from_budget(8, 5, 2))
        g = torch.Generator().manual_seed(7)
        out = dec.generate(prompts, g)
        return out.codes, out.extras["steps"], g.get_state()

    now = run()
    with monkeypatch.context() as m:
        m.setattr(JacobiDrafts, "observe", legacy_observe)
        before = run()
    for a, b in zip(now, before):
        assert torch.equal(a, b)
    assert JacobiProposer().describe() == {"name": "jacobi", "init": "uniform", "init_q": "onehot"}


# --------------------------------------------------------------------------------------------- presets
def test_presets_take_the_models_window_and_are_lossless():
    from hawkspec.cli.common import CONF_DIR
    from hawkspec.cli.eval import decoder_config

    windows = {"lumina_mgpt_768": 31, "lumina_mgpt_512": 31, "janus_pro_7b": 15, "tiny": 15}
    for backbone, window in windows.items():
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=[f"backbone={backbone}", "eval.decoders=[scd_maximal,scd_gumbel,sjd]"])
            for name, coupling in (("scd_maximal", "maximal"), ("scd_gumbel", "gumbel")):
                dec = OmegaConf.to_container(decoder_config(cfg, name), resolve=True)
                assert dec["tree"]["budget"] == dec["tree"]["max_depth"] == window, (backbone, name)
                assert dec["proposer"]["coupling"] == coupling
                assert dec["acceptance"]["_target_"].endswith("ExactAcceptance")
                sjd = OmegaConf.to_container(decoder_config(cfg, "sjd"), resolve=True)
                assert dec["proposer"]["ar_edges"] == sjd["proposer"]["ar_edges"]  # SCD's demos: SJD's edges


@pytest.mark.parametrize("name", ["scd_maximal", "scd_gumbel"])
def test_preset_builds_decodes_and_describes_itself(name):
    from hawkspec.cli.common import CONF_DIR
    from hawkspec.decoding.build import build_decoder
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"decoder={name}"])
    dec = build_decoder(the_decoder(cfg), bb, SamplingConfig(temperature=1.0, top_k=16, cfg_scale=2.0))
    assert dec.lossless
    out = dec.generate(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 4) and (out.codes >= 0).all() and (out.codes < 64).all()
    desc = dec.describe()
    assert desc["name"] == name and desc["proposer"]["coupling"] == name.split("_")[1]


def test_bad_coupling_is_refused_naming_the_key():
    from hawkspec.decoding.proposers import JacobiSource

    with pytest.raises(ValueError, match="decoder.proposer.coupling"):
        JacobiProposer(coupling="released")
    with pytest.raises(ValueError, match="coupling"):
        JacobiSource(coupling="max")
