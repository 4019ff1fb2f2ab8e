"""LlamaGen as its authors run it (FoundationVision/LlamaGen, t2i): the caption cleaning of ``language/t5.py``
(applied twice), captions over 120 T5 tokens cut as the official tokenizer call cuts them, pixels rounded as
``sample_t2i_ddp.py`` writes them, guidance only for ``cfg_scale > 1`` (``generate.py``), and top-p after top-k and
temperature (``sample()`` / ``top_k_top_p_filtering``) in the one target every decoder samples. Each pinned by a case
worked out by hand from the official code."""

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.llamagen import (
    CAPTION_TOKENS,
    LlamaGenBackbone,
    clean_caption,
    clean_caption_once,
    to_uint8_rounded,
)
from hawkspec.cli.common import CONF_DIR
from hawkspec.data.procedural import VOCAB_WORDS
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig, target_probs
from hawkspec.testing import compose, the_decoder

PROMPTS = ["a large red circle in the center", "a small blue square on the left on a plain white background"]


@pytest.fixture(scope="module")
def bb() -> LlamaGenBackbone:
    return LlamaGenBackbone.random(rows=4, cols=4, num_codes=64, seed=0)


# ----------------------------------------------------------------------------------------------- caption cleaning
@pytest.mark.parametrize("raw, cleaned", [
    # PartiPrompts that read differently cleaned (25 of the 1,632 do):
    ("U.S. 101", "u. s. 101"),  # lower-cased; `(\D[,./])\b` puts a space after "u." (a word follows), not "s."
    ("A set of 2x2 emoji icons", "a set of emoji icons"),  # sizes "NxM" are dropped, the spaces merged
    ("a corgi’s head", "a corgi's head"),  # curly quotes -> ASCII
    ("the word 'START'", "the word 'start"),  # a final ' is dropped (the opening one stays)
    ("A group of farm animals (cows, sheep, and pigs) made out of cheese",
     "a group of farm animals cows, sheep, and pigs made out of cheese"),  # brackets -> spaces -> one space
    ("the letters P A X forming an elephant's shape.  the elephant",
     "the letters p a x forming an elephant's shape. the elephant"),  # runs of spaces -> one
    # what the web-caption rules do:
    ("<p>A cat &amp; a dog</p> by @artist, see https://example.com/cat",
     "a cat a dog by , see"),  # URL, then markup (BeautifulSoup: "&amp;" -> "&"), @name; "&" -> space
    ("this-is-my-cute-cat_photo", "this is my cute cat photo"),  # more than three - or _: words
    ("a-b-c", "a-b-c"),  # two: kept
    ("Crème brûlée — on a “plate”", 'crème brûlée - on a "plate"'),  # every dash -> "-", quotes unified
    ("IMG_1234.jpg a sunset #12", "a sunset"),  # file names and "#12" dropped
    ("a 1920x1080 wallpaper of 漢字 mountains", "a wallpaper of mountains"),  # sizes and CJK dropped
    ("a b\\nc", "a b c"),  # a literal backslash-n
    ("  MIXED Case  ", "mixed case"),
])
def test_clean_caption_as_the_official_t5_embedder(raw, cleaned):
    assert clean_caption(raw) == cleaned


@pytest.mark.parametrize("raw, once, twice", [
    ("a+b%2Bc", "a b+c", "a b c"),  # unquote_plus: "+" -> " " and "%2B" -> "+"; the second pass turns that "+" too
    ("page page 1 2", "page 2", ""),  # "page 1" is boilerplate; once removed, "page 2" is too
])
def test_clean_caption_runs_twice(raw, once, twice):
    assert clean_caption_once(raw) == once and clean_caption(raw) == twice


def test_encode_reads_the_cleaned_caption(bb):
    raw = "<p>A LARGE red circle</p> http://example.com"
    assert bb.caption_text(raw) == "a large red circle"
    got, want = bb.encode([raw]), bb.encode(["a large red circle"])
    assert got.cond == want.cond and torch.equal(got.extras["caption"][0], want.extras["caption"][0])
    bb.clean_caption = False  # official use_text_preprocessing=False: lower-case and strip only
    try:
        assert bb.caption_text(raw) == raw.lower() and bb.encode([raw]).cond != want.cond
    finally:
        bb.clean_caption = True


def test_over_long_captions_are_cut_as_the_official_tokenizer(bb):
    """``tokenizer(max_length=120, truncation=True)``: the first 119 tokens and </s>; the T5 features are then those
    of the first 119 words. backbone.strict_length=true refuses the prompt instead."""
    words = [VOCAB_WORDS[i % len(VOCAB_WORDS)] for i in range(130)]
    long, cut = " ".join(words), " ".join(words[: CAPTION_TOKENS - 1])
    enc, ref = bb.encode([PROMPTS[0], long]), bb.encode([cut])
    assert enc.cond[1].count(bb.CAPTION_SLOT) == CAPTION_TOKENS and enc.cond[1] == ref.cond[0]
    torch.testing.assert_close(enc.extras["caption"][1], ref.extras["caption"][0])
    bb.strict_length = True
    try:
        with pytest.raises(ValueError, match=r"prompt 1 has 131 T5 tokens.*backbone.strict_length"):
            bb.encode([PROMPTS[0], long])
        bb.encode([cut])  # 120 tokens fit
    finally:
        bb.strict_length = False


# ----------------------------------------------------------------------------------------------- pixels
def test_pixels_are_rounded_as_the_official_evaluation_script(bb, monkeypatch):
    """``torch.clamp(127.5 * x + 128.0, 0, 255)`` cast to uint8: -1 -> 0.5 -> 0, -0.5 -> 64.25 -> 64, 0 -> 128,
    0.25 -> 159.875 -> 159, 1 -> 255.5 -> 255; out-of-range values clamp. ((x+1)/2*255 cast would give 63 and 127.)"""
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0])
    assert to_uint8_rounded(x).tolist() == [0, 0, 64, 128, 159, 255, 255]
    monkeypatch.setattr(bb.vq, "decode", lambda codes: x.view(1, 1, 1, -1).expand(codes.shape[0], 3, 1, -1))
    img = bb.decode_codes(torch.zeros(2, 4, 4, dtype=torch.long))
    assert img.dtype == torch.uint8 and img[1, 2, 0].tolist() == [0, 0, 64, 128, 159, 255, 255]


# ----------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("scale, off_below_one, use_cfg", [
    (0.0, True, False), (0.5, True, False), (1.0, True, False), (1.5, True, True), (7.5, True, True),
    (0.5, False, True), (1.0, False, False), (0.0, False, True),  # the other backbones: guidance unless exactly 1
])
def test_cfg_rule(scale, off_below_one, use_cfg):
    assert SamplingConfig(cfg_scale=scale, cfg_off_below_one=off_below_one).use_cfg is use_cfg


def test_llamagen_cfg_below_one_runs_the_conditional_stream_alone(bb, monkeypatch):
    """Official ``generate``: ``if cfg_scale > 1.0`` -- else the conditional logits alone. AR at CFG 0.5 under the
    LlamaGen config then equals AR without guidance, and its prefill runs one stream."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        s = SamplingConfig(**compose("eval", overrides=["backbone=llamagen_xl_256", "sampling.cfg_scale=0.5",
                                                        "sampling.top_k=16"]).sampling)
    assert s.cfg_off_below_one and not s.use_cfg
    streams = []
    prefill = bb.prefill
    monkeypatch.setattr(bb, "prefill", lambda *a, **k: streams.append(k["cfg"]) or prefill(*a, **k))
    got = ar_generate(bb, PROMPTS, s, torch.Generator().manual_seed(3))
    want = ar_generate(bb, PROMPTS, SamplingConfig(temperature=1.0, top_k=16, cfg_scale=1.0),
                       torch.Generator().manual_seed(3))
    assert torch.equal(got.codes, want.codes) and streams == [False, False]
    ar_generate(bb, PROMPTS, SamplingConfig(temperature=1.0, top_k=16, cfg_scale=0.5), torch.Generator())
    assert streams[-1] is True  # without the rule a scale below 1 mixes the streams


# ----------------------------------------------------------------------------------------------- top-p
P = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("kw, want", [
    # cumulative mass 0.5, 0.8, 0.95, 1: keep codes while the mass *before* them is <= top_p
    (dict(top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
    (dict(top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (dict(top_p=0.4), [1, 0, 0, 0]),  # the most likely code always stays
    (dict(top_p=0.9, top_k=2), [0.625, 0.375, 0, 0]),  # after top-k: 0.625, 1.0 -> both stay
    # after temperature 2: p ~ sqrt(P) = 0.379, 0.294, 0.208, 0.120 -> mass before 0, 0.379, 0.673, 0.880
    (dict(top_p=0.7, temperature=2.0), (P.sqrt() * torch.tensor([1, 1, 1, 0])).div(P.sqrt()[:3].sum()).tolist()),
])
def test_top_p_hand_worked(kw, want):
    s = SamplingConfig(**{"top_k": 0, "cfg_scale": 1.0, **kw}).validate(4)
    torch.testing.assert_close(target_probs(P.log()[None], s)[0], torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-5)


def test_top_p_equals_transformers_warpers():
    """Temperature, top-k, top-p as HF's warpers apply them (LlamaGen's sample() divides first, then filters)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(1.0, 0, 0.9), (0.7, 50, 0.8), (1.6, 200, 0.3), (1.0, 100, 0.999)]:
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        x = TopKLogitsWarper(k)(None, x) if k else x
        want = torch.softmax(TopPLogitsWarper(p)(None, x), -1)
        got = target_probs(logits, SamplingConfig(temperature=t, top_k=k, cfg_scale=1.0, top_p=p))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_top_p_off_and_greedy_leave_the_target_unchanged():
    logits = torch.randn(5, 7, 40, generator=torch.Generator().manual_seed(1))
    kth = torch.topk(logits, 8, -1).values[..., -1:]
    before = torch.softmax(logits.masked_fill(logits < kth, float("-inf")) / 0.8, -1)  # the formula before top-p
    for off in (None, 1.0):
        assert torch.equal(target_probs(logits, SamplingConfig(temperature=0.8, top_k=8, top_p=off)), before)
    greedy = target_probs(logits, SamplingConfig(temperature=0.0, top_k=8, top_p=0.3))
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(5, 7))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True])
def test_top_p_out_of_range_names_the_key(bad):
    with pytest.raises(ValueError, match="sampling.top_p"):
        SamplingConfig(top_p=bad).validate(512)


@pytest.mark.parametrize("preset", ["ar", "sjd"])
def test_top_p_reaches_every_decoder(bb, preset):
    """A nucleus so small it keeps one code makes sampling greedy, for AR and a speculative decoder alike (the exact
    rule against a one-hot target accepts only the argmax): both equal greedy AR."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"decoder={preset}"])
    s = SamplingConfig(temperature=1.0, top_k=0, cfg_scale=7.5, top_p=1e-6, cfg_off_below_one=True).validate(64)
    got = build_decoder(the_decoder(cfg), bb, s).generate(PROMPTS, torch.Generator().manual_seed(0))
    want = ar_generate(bb, PROMPTS, SamplingConfig(temperature=0.0, top_k=0, cfg_scale=7.5))
    assert torch.equal(got.codes, want.codes)
