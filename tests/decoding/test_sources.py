"""Proposers composed of draft sources (SpatialProposer): the merge into the spatial pool; a proposer written as
sources in YAML and the same built in Python decide alike; hawk_eagle (Hawk's vertical cache + the EAGLE draft model) equals
greedy AR and passes the enumerable chi-square test with the exact rule, with static and dynamic trees; a new
mix built from config only; checkpoint errors name their key; eval.decoders=all skips what is not trained."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.analysis.acceptance import decode_with_sources
from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.build import build_decoder, decoder_presets
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import DraftSource, EagleSource, Pools, SpatialProposer, VerticalSource
from hawkspec.decoding.proposers.config import proposer_from_config
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import paths_from_budget
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.heads.eagle import EagleConfig, EagleDrafter
from hawkspec.testing import ExactByTries, ForgetfulResidual

PROMPTS = ["a red circle", "a blue square on the left"]


def randomised(module, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def hawk_eagle(heads, drafter, draft="topk") -> SpatialProposer:
    return SpatialProposer({"vertical": VerticalSource(heads, draft=draft), "eagle": EagleSource(drafter=drafter, draft=draft)},
                           order=["vertical", "eagle"], name="hawk_eagle")


# --------------------------------------------------------------------------------------------- the merge
class Stub(DraftSource):
    def __init__(self, tokens, q=None, logp=None):
        super().__init__()
        self.pools = Pools(torch.tensor(tokens)[None, None], q, logp)

    def propose(self, *args):
        return self.pools


def merged(order=None, priority=None, size=4, **sources) -> Pools:
    prop = SpatialProposer(sources, order=order, priority=priority)
    return prop.merge({n: s.pools for n, s in sources.items()}, size)


def test_the_pool_dedupes_point_masses_and_follows_the_order():
    v, h = Stub([3, -1, 5]), Stub([5, 7, 3, 1])
    assert merged(v=v, h=h).tokens[0, 0].tolist() == [3, 5, 7, 1]  # v first, h's 5 and 3 already there
    # members by priority (all of v, then h), verification order by `order`: h first, a shared code at its best
    assert merged(order=["h", "v"], priority=["v", "h"], v=v, h=h).tokens[0, 0].tolist() == [5, 7, 3, 1]
    assert merged(order=[["v", "h"]], v=v, h=h).tokens[0, 0].tolist() == [3, 5, 7, 1]  # v1 h1 (v2 none) v3 h2
    assert merged(order=["h", "v"], v=v, h=h).tokens[0, 0].tolist() == [5, 7, 3, 1]
    assert merged(size=6, v=v, h=h).tokens[0, 0].tolist() == [3, 5, 7, 1, -1, -1]  # fewer offers than slots
    assert merged(v=v, h=h).q is None and merged(v=v, h=h).logp is None


def test_sampled_drafts_keep_their_q_and_never_compete_when_left_out_of_priority():
    K = 8
    qj = torch.softmax(torch.randn(1, 1, 1, K), -1)
    v, h, j = Stub([3, 5]), Stub([5, 6, 2], logp=torch.zeros(1, 1, 3)), Stub([5], q=qj)
    first = merged(order=["j", "v", "h"], priority=["v", "h"], size=3, v=v, h=h, j=j)
    assert first.tokens[0, 0].tolist() == [5, 3, 5]  # the sampled 5 is a draw of its own: it stays
    assert torch.equal(first.q[0, 0, 0], qj[0, 0, 0])
    assert torch.equal(first.q[0, 0, 1], torch.nn.functional.one_hot(torch.tensor(3), K).float())
    assert first.logp is None  # v gives no scores
    fill = merged(order=["v", "h", "j"], priority=["v", "h"], size=3, v=v, h=h, j=j)
    assert fill.tokens[0, 0].tolist() == [3, 5, 6]  # the heads fill the pool: no room for j
    fill = merged(order=["v", "h", "j"], priority=["v", "h"], size=5, v=v, h=h, j=j)
    assert fill.tokens[0, 0].tolist() == [3, 5, 6, 2, 5]


def test_bad_compositions_are_refused():
    with pytest.raises(ValueError, match="decoder.proposer.sources is empty"):
        SpatialProposer({})
    with pytest.raises(ValueError, match="decoder.proposer.order"):
        SpatialProposer({"a": Stub([1]), "b": Stub([2])}, order=["a"])
    with pytest.raises(ValueError, match="decoder.proposer.priority"):
        SpatialProposer({"a": Stub([1])}, priority=["a", "a"])
    with pytest.raises(TypeError, match="decoder.proposer.sources.a"):
        SpatialProposer({"a": object()})


# --------------------------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def bb():
    from hawkspec.testing import build_random_backbone

    return build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)


@pytest.fixture(scope="module")
def checkpoints(bb, tmp_path_factory):
    """Random Hawk heads and an EAGLE draft model, saved like hawkspec-train's exports: paths.heads_dir."""
    root = tmp_path_factory.mktemp("heads")
    heads = randomised(DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), bb), 0, 0.05)
    heads.save(root / "hawk")
    randomised(EagleDrafter.for_backbone(EagleConfig(), bb), 1, 0.05).save(root / "eagle")
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=False), bb).save(root / "medusa")
    return root


def preset(name: str, heads_dir, *overrides):
    """The node of preset ``name`` in a run (``decoder=NAME decoder.KEY=...``, as the console scripts expand it)."""
    from hawkspec.cli.overrides import expand

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        args = expand([f"decoder={name}", f"paths.heads_dir={heads_dir}", *overrides], CONF_DIR)
        return compose("eval", overrides=args).eval.decoders[name]


@pytest.mark.parametrize("draft, dynamic", [("topk", None), ("topk", 6), ("sample", None)])
def test_greedy_hawk_eagle_equals_greedy_ar(bb, checkpoints, draft, dynamic):
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=3.0)
    heads = DraftHeads.load(checkpoints / "hawk", bb)
    drafter = EagleDrafter.load(checkpoints / "eagle", bb)
    dec = SpeculativeDecoder(bb, hawk_eagle(heads, drafter, draft), GreedyAcceptance(), s, paths_from_budget(12, 4, 3),
                             dynamic_nodes=dynamic)
    out, src = decode_with_sources(dec, PROMPTS)  # the acceptance analysis reads the composed proposer's cache
    ref = ar_generate(bb, PROMPTS, s)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.codes, ref.codes)
    assert src["vertical_offered"].any()


def test_hawk_eagle_preset_builds_from_its_two_checkpoints(bb, checkpoints):
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=1.0)
    dec = build_decoder(preset("hawk_eagle", checkpoints), bb, s)
    prop = dec.proposer
    assert isinstance(prop, SpatialProposer) and list(prop.sources) == ["vertical", "eagle"] and dec.lossless
    assert prop.sources["vertical"].checkpoint_key == "eval.decoders.hawk_eagle.heads_path"
    assert prop.sources["eagle"].checkpoint_key == "eval.decoders.hawk_eagle.eagle_path"
    assert dec.describe()["proposer"]["order"] == ["vertical", "eagle"]
    assert torch.equal(dec.generate(PROMPTS).tokens, ar_generate(bb, PROMPTS, s).tokens)
    dyn = build_decoder(preset("hawk_eagle", checkpoints, "decoder.tree.dynamic=6"), bb, s)
    assert torch.equal(dyn.generate(PROMPTS).tokens, ar_generate(bb, PROMPTS, s).tokens)


HAWK_AS_SOURCES = """
name: hawk_as_sources
heads_path: {heads}
proposer:
  _target_: hawkspec.decoding.proposers.SpatialProposer
  sources:
    horizontal: {{_target_: hawkspec.decoding.proposers.sources.HorizontalSource, path: '${{....heads_path}}', draft: sample}}
    vertical: {{_target_: hawkspec.decoding.proposers.sources.VerticalSource, path: '${{....heads_path}}', draft: sample,
               candidates: 2}}
    jacobi: {{_target_: hawkspec.decoding.proposers.sources.JacobiSource}}
  order: [jacobi, horizontal, vertical]
  priority: [horizontal, vertical]
acceptance: {{_target_: hawkspec.decoding.acceptance.ExactAcceptance}}
tree: {{budget: 10, max_depth: 5, max_rank: 2}}
"""


def test_hawk_written_as_sources_decides_like_the_proposer_option_built_in_python(bb, checkpoints):
    """A composition written in a decoder node and conf/decoder/proposer/hawk_jacobi.yaml built in Python with its
    sweep axes set as source keys are one proposer: same images, same acceptances."""
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=3.0)
    cfg = OmegaConf.create(HAWK_AS_SOURCES.format(heads=checkpoints / "hawk"))
    composed = build_decoder(cfg, bb, s)
    assert composed.proposer.sources["horizontal"].heads is composed.proposer.sources["vertical"].heads  # one load
    heads = DraftHeads.load(checkpoints / "hawk", bb)
    prop = proposer_from_config("hawk_jacobi", {"horizontal": heads, "vertical": heads},
                                sources__horizontal__draft="sample", sources__vertical__draft="sample",
                                sources__vertical__candidates=2, order=["jacobi", "horizontal", "vertical"],
                                priority=["horizontal", "vertical"])
    assert list(prop.sources) == ["horizontal", "vertical", "jacobi"]
    python = SpeculativeDecoder(bb, prop, ExactAcceptance(), s, paths_from_budget(10, 5, 2))
    a, b = (d.generate(PROMPTS * 2, torch.Generator().manual_seed(3)) for d in (composed, python))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.accept_map, b.accept_map)
    assert a.accept_map.sum() > 0


NEW_MIX = """
name: three_sources
heads_path: {heads}
eagle_path: {eagle}
proposer:
  _target_: hawkspec.decoding.proposers.SpatialProposer
  name: three_sources
  sources:
    horizontal: {{_target_: hawkspec.decoding.proposers.sources.HorizontalSource, path: '${{....heads_path}}'}}
    vertical: {{_target_: hawkspec.decoding.proposers.sources.VerticalSource, path: '${{....heads_path}}', vsd: 1}}
    eagle: {{_target_: hawkspec.decoding.proposers.sources.EagleSource, path: '${{....eagle_path}}'}}
  order: [vertical, [eagle, horizontal]]    # cached vertical drafts, then EAGLE's and Medusa's interleaved
acceptance: {{_target_: hawkspec.decoding.acceptance.GreedyAcceptance}}
tree: {{budget: 12, max_depth: 4, max_rank: 3, dynamic: 8}}
"""


def test_a_new_mix_is_config_only(bb, checkpoints):
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=3.0)
    cfg = OmegaConf.create(NEW_MIX.format(heads=checkpoints / "hawk", eagle=checkpoints / "eagle"))
    dec = build_decoder(cfg, bb, s)
    prop = dec.proposer
    assert prop.name == "three_sources" and prop.sources["vertical"].vsd == 1
    assert prop.sources["vertical"].share == [prop.sources["horizontal"]]  # the heads run once per step
    assert dec.describe()["proposer"]["order"] == ["vertical", ["eagle", "horizontal"]]
    seen = []
    propose = prop.propose

    def recorded(src_hidden, root_pos, code_pos, pool_size, generator):
        vertical = prop.vertical_drafts(code_pos)[..., 0]  # (B, J) the cached draft of vertical head 1
        seen.append((vertical, propose(src_hidden, root_pos, code_pos, pool_size, generator)))
        return seen[-1][1]

    prop.propose = recorded
    out = dec.generate(PROMPTS)
    assert torch.equal(out.tokens, ar_generate(bb, PROMPTS, s).tokens)
    assert all(p.logp is not None and p.q is None for _, p in seen)  # every source scores its drafts
    cached = [(v >= 0) for v, _ in seen]
    assert sum(int(c.sum()) for c in cached) > 0
    for (v, p), c in zip(seen, cached):  # the cached vertical draft leads its position's pool
        assert torch.equal(p.tokens[..., 0][c], v[c])


# --------------------------------------------------------------------------------------------- checkpoints
def test_a_missing_or_mismatched_eagle_checkpoint_names_its_key(bb, checkpoints, tmp_path):
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=1.0)
    with pytest.raises(FileNotFoundError, match="eval.decoders.hawk_eagle.eagle_path"):
        build_decoder(preset("hawk_eagle", checkpoints, f"decoder.eagle_path={tmp_path / 'none'}"), bb, s)
    with pytest.raises(ValueError, match="eval.decoders.hawk_eagle.eagle_path"):  # Hawk heads where the EAGLE model should be
        build_decoder(preset("hawk_eagle", checkpoints, f"decoder.eagle_path={checkpoints / 'hawk'}"), bb, s)
    with pytest.raises(ValueError, match="eval.decoders.hawk_eagle.heads_path"):  # heads without vertical heads
        build_decoder(preset("hawk_eagle", checkpoints, f"decoder.heads_path={checkpoints / 'medusa'}"), bb, s)
    with pytest.raises(FileNotFoundError, match="eval.decoders.hawk_eagle.heads_path"):
        build_decoder(preset("hawk_eagle", checkpoints, f"decoder.heads_path={tmp_path / 'none'}"), bb, s)
    from hawkspec.testing import build_random_backbone

    other = build_random_backbone(rows=4, cols=4, num_codes=32, seed=5)
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), other).save(tmp_path / "hawk")
    with pytest.raises(ValueError, match="eval.decoders.hawk_eagle.eagle_path.*num_codes"):  # an EAGLE model of another backbone
        build_decoder(preset("hawk_eagle", checkpoints, f"decoder.heads_path={tmp_path / 'hawk'}"), other,
                      SamplingConfig(top_k=16).validate(other.num_codes))
    # a literal path names the source's own key; an unset one too
    cfg = OmegaConf.create(NEW_MIX.format(heads=checkpoints / "hawk", eagle=checkpoints / "eagle"))
    cfg.proposer.sources.eagle.path = str(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="decoder.proposer.sources.eagle.path"):
        build_decoder(cfg, bb, s)
    cfg.proposer.sources.eagle.path = None
    with pytest.raises(ValueError, match="decoder.proposer.sources.eagle.path"):
        build_decoder(cfg, bb, s)


def test_errors_name_the_keys_below_the_decoders_node(bb, checkpoints, tmp_path):
    """build_decoder(key=...) hands every source its node's key: a missing checkpoint names the decoder-level key
    its path interpolates, a bad setting the source's own key."""
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=1.0)
    with pytest.raises(FileNotFoundError, match="eval.decoders.he.eagle_path"):
        build_decoder(preset("hawk_eagle", checkpoints, f"decoder.eagle_path={tmp_path / 'none'}"), bb, s,
                      key="eval.decoders.he")
    dec = build_decoder(preset("hawk_eagle", checkpoints), bb, s, key="eval.decoders.he")
    assert dec.proposer.key == "eval.decoders.he.proposer"
    v, e = dec.proposer.sources["vertical"], dec.proposer.sources["eagle"]
    assert (v.key, v.checkpoint_key) == ("eval.decoders.he.proposer.sources.vertical", "eval.decoders.he.heads_path")
    assert (e.key, e.checkpoint_key) == ("eval.decoders.he.proposer.sources.eagle", "eval.decoders.he.eagle_path")
    cfg = OmegaConf.create(NEW_MIX.format(heads=checkpoints / "hawk", eagle=checkpoints / "eagle"))
    cfg.proposer.sources.vertical.vsd = 7
    with pytest.raises(ValueError, match=r"eval.decoders.mix.proposer.sources.vertical.vsd=7"):
        build_decoder(cfg, bb, s, key="eval.decoders.mix")
    cfg.proposer.sources.vertical.vsd = 1
    cfg.proposer.sources.vertical.draft = "beam"
    with pytest.raises(Exception, match=r"eval.decoders.mix.proposer.sources.vertical.draft must be one of"):
        build_decoder(cfg, bb, s, key="eval.decoders.mix")


def test_eval_all_skips_the_presets_whose_checkpoint_is_missing(bb, checkpoints, tmp_path):
    """hawkspec-eval eval.decoders=all skips a preset whose build raises FileNotFoundError: here every preset
    that needs an EAGLE model (not trained in this heads_dir), and only those."""
    for name in ("hawk", "medusa"):
        (tmp_path / name).symlink_to(checkpoints / name)
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=1.0).validate(bb.num_codes)
    skipped = []
    for name in decoder_presets(CONF_DIR):
        try:  # the test model's rows hold 5 tokens: a lane of 3 (the tiny model's 6 is refused, naming the key)
            build_decoder(preset(name, tmp_path, "backbone.tuning.spatial_jacobi.lane=3"), bb, s)
        except FileNotFoundError as err:
            skipped.append(name)
            assert "eagle" in str(err)
    assert skipped == ["eagle", "eagle_gsd", "eagle_spatial", "hawk_eagle", "hawk_eagle_gsd"]


# --------------------------------------------------------------------------------------------- lossless
@pytest.fixture(scope="module")
def tiny():
    from hawkspec.metrics.lossless import image_distribution
    from hawkspec.testing import build_random_backbone, peaky

    bb = peaky(build_random_backbone(rows=2, cols=3, num_codes=4, seed=1), scale=0.3, seed=0)
    heads = randomised(DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=1), bb), 2, 0.3)
    drafter = randomised(EagleDrafter.for_backbone(EagleConfig(), bb), 3, 0.3)
    sampling = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
    grids, probs = image_distribution(bb, PROMPTS[0], sampling)
    return bb, heads, drafter, sampling, grids, probs


@pytest.mark.slow  # 3,000 images per case: 20-80 s each on 2 shared cores
@pytest.mark.parametrize("draft, rule, dynamic", [
    ("topk", ExactAcceptance, None), ("topk", ExactByTries, None), ("topk", ExactAcceptance, 5),
    ("sample", ExactAcceptance, None)])
def test_exact_hawk_eagle_is_lossless(tiny, draft, rule, dynamic):
    from hawkspec.metrics.lossless import chi_square

    bb, heads, drafter, sampling, grids, probs = tiny
    dec = SpeculativeDecoder(bb, hawk_eagle(heads, drafter, draft), rule(), sampling, paths_from_budget(10, 3, 3),
                             dynamic_nodes=dynamic)
    out, src = decode_with_sources(dec, [PROMPTS[0]] * 3000, torch.Generator().manual_seed(123))
    assert out.accepted_tokens.float().mean() > 0.5 and src["vertical"].any()  # both sources are exercised
    assert chi_square(out.codes.flatten(1), grids, probs) > 1e-3
    if rule is ExactAcceptance and draft == "topk" and dynamic is None:  # the test sees a broken rule here
        broken = SpeculativeDecoder(bb, hawk_eagle(heads, drafter, draft), ForgetfulResidual(), sampling,
                                    paths_from_budget(10, 3, 3)).generate([PROMPTS[0]] * 3000,
                                                                          torch.Generator().manual_seed(123))
        assert chi_square(broken.codes.flatten(1), grids, probs) < 1e-3
