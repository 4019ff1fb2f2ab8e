"""Lumina-mGPT's image start, ``backbone.image_start``: ``forced`` (default) writes ``<racm3:break>`` and the two size
tokens after the prompt; ``sampled`` lets the model draw them as the official ``inference_solver.py`` does -- the
conditional stream alone (no CFG yet), the whole vocabulary, ``<racm3:break>`` under the text top-k 10 and the size
tokens under the image top-k, at the run's temperature -- and refuses a draw that is not the configured image start
(the official code would answer in text, or draw another size). Hand-worked cases use a scripted model
(``_full_logits``) whose next-token logits are chosen per step."""

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.chameleon import TEXT_TOP_K, ChameleonBackbone, size_token
from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.testing import compose

PROMPTS = ["a large red circle in the center", "a small blue square"]


def make(**kw) -> ChameleonBackbone:
    """4x4 codes, 16 px: a size token counts 2 latents of the 4x VQGAN (8 px), so 16 px is <reserved08802>."""
    return ChameleonBackbone.random(rows=4, cols=4, num_codes=32, seed=0, **kw)


@pytest.fixture(scope="module")
def forced() -> ChameleonBackbone:
    return make()


def scripted(bb, step_logits, calls=None):
    """A stand-in for ``bb._full_logits``: ``step_logits[step]`` (vocab,) for every row, the step read from the row's
    last token (end of turn: 0, <racm3:break>: 1, else 2). ``calls`` records the rows it was given."""
    vmap = bb.model.config.vocabulary_map

    def logits(seqs):
        if calls is not None:
            calls.append([list(s) for s in seqs])
        steps = [0 if s[-1] == bb.layout.end_of_turn_id else 1 if s[-1] == vmap["<racm3:break>"] else 2 for s in seqs]
        return torch.stack([step_logits[i] for i in steps])

    return logits


def certain(bb, tokens):
    """Logits that put all the mass on ``tokens[step]`` at each step."""
    V = bb.model.config.vocab_size
    out = []
    for t in tokens:
        x = torch.full((V,), -30.0)
        x[t] = 30.0
        out.append(x)
    return out


# ----------------------------------------------------------------------------------------------- forced (default)
def test_forced_is_the_default_and_draws_nothing(forced, monkeypatch):
    assert forced.image_start == "forced"
    monkeypatch.setattr(forced, "_full_logits", lambda seqs: pytest.fail("forced must not draw the image start"))
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    forced.prefill(forced.encode(PROMPTS), cfg=True, generator=g)
    assert torch.equal(g.get_state(), before)


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match="backbone.image_start"):
        make(image_start="guessed")


def test_yaml_default_and_the_sampled_keys_follow_the_run_sampling():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["backbone=lumina_mgpt_768"])
        assert cfg.backbone.image_start == "forced"
        assert (cfg.backbone.image_start_top_k, cfg.backbone.image_start_temperature) == (2000, 1.0)
        cfg = compose("generate", overrides=["backbone=lumina_mgpt_512", "backbone.image_start=sampled",
                                             "sampling.top_k=7", "sampling.temperature=0.5"])
        assert (cfg.backbone.image_start, cfg.backbone.image_start_top_k, cfg.backbone.image_start_temperature) == (
            "sampled", 7, 0.5)


# ----------------------------------------------------------------------------------------------- the distribution
def test_image_start_distribution_hand_worked():
    """logits = token id: <racm3:break> keeps the 10 highest ids (text top-k), a size token the image top-k highest;
    temperature divides the logits. So p(V-1-j) = e^-j / sum_{i<k} e^-i at T 1, e^-2j / ... at T 0.5."""
    bb = make(image_start="sampled", image_start_top_k=3, image_start_temperature=1.0)
    V = bb.model.config.vocab_size
    logits = torch.arange(V, dtype=torch.float32)
    for step, k in ((0, TEXT_TOP_K), (1, 3), (2, 3)):
        p = bb.image_start_probs(logits, step)
        want = torch.zeros(V)
        want[V - k:] = torch.softmax(torch.arange(k, dtype=torch.float32), 0)
        torch.testing.assert_close(p, want)
    bb.image_start_temperature = 0.5
    want = torch.zeros(V)
    want[V - 3:] = torch.softmax(2 * torch.arange(3, dtype=torch.float32), 0)
    torch.testing.assert_close(bb.image_start_probs(logits, 1), want)
    bb.image_start_top_k = 0  # off: the whole vocabulary
    assert bool((bb.image_start_probs(logits / 100, 2) > 0).all())


def test_full_logits_are_the_model_s_next_token_logits(forced):
    """Left-padded, uncached rows give each prompt's own next-token logits (HF's Chameleon forward, which masks
    image tokens: compared on the others)."""
    enc = forced.encode(PROMPTS)
    got = forced._full_logits(enc.cond)
    image = torch.zeros(got.shape[1], dtype=torch.bool)
    image[forced.code_token_ids] = True
    for i, ids in enumerate(enc.cond):
        ref = forced.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        torch.testing.assert_close(got[i, ~image], ref[~image], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- sampled
def test_sampled_start_equals_forced_and_spends_three_draws_per_prompt(forced, monkeypatch):
    bb = make(image_start="sampled")
    calls = []
    monkeypatch.setattr(bb, "_full_logits", scripted(bb, certain(bb, bb.image_start_ids), calls))
    enc = bb.encode(PROMPTS)
    g = torch.Generator().manual_seed(5)
    state, h = bb.prefill(enc, cfg=True, generator=g)
    ref_state, ref_h = forced.prefill(enc, cfg=True)
    assert torch.equal(h, ref_h) and torch.equal(state.key_mask, ref_state.key_mask)
    spent = torch.Generator().manual_seed(5)
    for _ in range(3):
        torch.rand((len(PROMPTS), 1), generator=spent)  # one uniform per prompt and token
    assert torch.equal(g.get_state(), spent.get_state())
    # no CFG for the image start: the conditional rows only, each growing by the token just drawn
    assert [len(c) for c in calls] == [2, 2, 2] and calls[0] == enc.cond
    assert [row[-2:] for row in calls[2]] == [bb.image_start_ids[:2]] * 2


def test_sampled_draw_follows_the_generator(monkeypatch):
    """<racm3:break> and the word "the" equally likely first: the CDF is taken in id order, so a prompt draws the
    lower id when its uniform is below 1/2. Prompts that draw "the" are refused (the official code writes text)."""
    bb = make(image_start="sampled")
    vmap = bb.model.config.vocabulary_map
    brk, the = vmap["<racm3:break>"], vmap["the"]
    first = torch.full((bb.model.config.vocab_size,), -30.0)
    first[[brk, the]] = 0.0
    steps = [first] + certain(bb, bb.image_start_ids)[1:]
    monkeypatch.setattr(bb, "_full_logits", scripted(bb, steps))
    enc = bb.encode(PROMPTS)
    seen = set()
    for seed in range(8):
        u = torch.rand((len(PROMPTS), 1), generator=torch.Generator().manual_seed(seed))[:, 0]
        expect_break = [(x < 0.5) == (brk < the) for x in u.tolist()]
        g = torch.Generator().manual_seed(seed)
        seen.add(all(expect_break))
        if all(expect_break):
            assert bb.sample_image_start(enc, g).tolist() == [bb.image_start_ids] * 2
        else:
            with pytest.raises(ValueError, match=rf"prompt {expect_break.index(False)} .*drew 'the' instead of "
                                                 r"<racm3:break>.*answer in text"):
                bb.sample_image_start(enc, g)
    assert seen == {True, False}  # both outcomes among these seeds


def test_break_outside_the_text_top_10_is_never_drawn(monkeypatch):
    """Ten other tokens a hair above <racm3:break>: without a top-k it would carry 1/11 of the mass; under the text
    top-k 10 none, so every seed is refused."""
    bb = make(image_start="sampled")
    vmap = bb.model.config.vocabulary_map
    first = torch.full((bb.model.config.vocab_size,), -30.0)
    others = [i for n, i in vmap.items() if n.startswith("IMGIMG")][:TEXT_TOP_K]
    first[others] = 1.0
    first[vmap["<racm3:break>"]] = 0.999
    monkeypatch.setattr(bb, "_full_logits", scripted(bb, [first] + certain(bb, bb.image_start_ids)[1:]))
    enc = bb.encode(PROMPTS[:1])
    for seed in range(20):
        with pytest.raises(ValueError, match="instead of <racm3:break>"):
            bb.sample_image_start(enc, torch.Generator().manual_seed(seed))


def test_another_size_is_refused_naming_both(monkeypatch):
    """Height token <reserved08803> is 3 grids of 8 px = 24 px: the official code would draw a 24 x 16 image."""
    bb = make(image_start="sampled")
    vmap = bb.model.config.vocabulary_map
    brk, h, w = bb.image_start_ids
    assert h == w == vmap[size_token(2)]
    monkeypatch.setattr(bb, "_full_logits", scripted(bb, certain(bb, [brk, vmap[size_token(3)], w])))
    with pytest.raises(ValueError, match=r"<reserved08803> <reserved08802> \(height x width: 24 x 16 px\) where "
                                         r"backbone.resolution asks for 16 x 16 \(<reserved08802> <reserved08802>\)\. "
                                         r"The official code would go on drawing an image of the drawn size"):
        bb.prefill(bb.encode(PROMPTS), cfg=True, generator=torch.Generator().manual_seed(0))


def test_teacher_forcing_never_draws_and_greedy_ar_is_unchanged(forced, monkeypatch):
    bb = make(image_start="sampled")
    body = forced.body_ids(torch.zeros(2, 4, 4, dtype=torch.long))
    monkeypatch.setattr(bb, "_full_logits", lambda seqs: pytest.fail("teacher forcing has its image start"))
    enc = bb.encode(PROMPTS)
    torch.testing.assert_close(bb.teacher_forced(enc, body, cfg=True), forced.teacher_forced(enc, body, cfg=True))
    assert bb.image_start == "sampled"
    monkeypatch.setattr(bb, "_full_logits", scripted(bb, certain(bb, bb.image_start_ids)))
    s = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=3.0)
    assert torch.equal(ar_generate(bb, PROMPTS, s).tokens, ar_generate(forced, PROMPTS, s).tokens)


def test_greedy_image_start_takes_the_argmax(monkeypatch):
    bb = make(image_start="sampled", image_start_temperature=0.0)
    steps = certain(bb, bb.image_start_ids)
    for x in steps:  # every other token close behind: a sample could take them, the argmax cannot
        x.masked_fill_(x < 0, 29.9)
    monkeypatch.setattr(bb, "_full_logits", scripted(bb, steps))
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert bb.sample_image_start(bb.encode(PROMPTS), g).tolist() == [bb.image_start_ids] * 2
    assert torch.equal(g.get_state(), before)  # no uniform spent
