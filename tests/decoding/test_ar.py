import pytest
import torch

from hawkspec.decoding.ar import ar_generate
from hawkspec.backbones.hf_reference import hf_generate
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, target_probs


@pytest.mark.parametrize("mode", ["none", "static"])  # transformers' default cache, and its static cache
def test_greedy_ar_equals_transformers_generate(random_backbone, prompts, mode):
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=1.0)
    ours = ar_generate(random_backbone, prompts, s)
    ref = hf_generate(random_backbone, prompts, s, compile=mode)
    assert torch.equal(ours.tokens, ref)
    assert ours.forwards == random_backbone.grid.length


def test_greedy_ar_equals_generate_on_shipped_model():
    from hawkspec.backbones.tiny import TinyBackbone

    bb = TinyBackbone.from_pretrained()
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=1.0)
    p = ["a large red circle in the center on a plain white background", "a small blue square on the left"]
    assert torch.equal(ar_generate(bb, p, s).tokens, hf_generate(bb, p, s))


def test_seeded_sampling_is_reproducible(random_backbone, prompts):
    s = SamplingConfig(temperature=1.0, top_k=20, cfg_scale=3.0)
    a = ar_generate(random_backbone, prompts, s, torch.Generator().manual_seed(7))
    b = ar_generate(random_backbone, prompts, s, torch.Generator().manual_seed(7))
    c = ar_generate(random_backbone, prompts, s, torch.Generator().manual_seed(8))
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, c.codes)


def test_layout_tokens_are_forced(random_backbone, prompts):
    out = ar_generate(random_backbone, prompts, SamplingConfig(), torch.Generator().manual_seed(0))
    forced = random_backbone.grid.forced_mask()
    assert (out.tokens[:, forced] == random_backbone.eol_token_id).all()
    assert (out.tokens[:, ~forced] >= random_backbone.layout.code_offset).all()
    assert out.codes.shape == (2, random_backbone.grid.rows, random_backbone.grid.cols)


def test_top_k_and_cfg_define_the_target():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    p = target_probs(logits, SamplingConfig(temperature=1.0, top_k=2, cfg_scale=1.0))
    assert (p[0, :2] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    torch.testing.assert_close(p[0, 2:], torch.softmax(torch.tensor([2.0, 3.0]), 0))
    both = torch.tensor([[1.0, 2.0], [0.5, 0.5]])
    torch.testing.assert_close(combine_cfg(both, 2, 3.0), torch.tensor([[0.5 + 3 * 0.5, 0.5 + 3 * 1.5]]))
    g = target_probs(logits, SamplingConfig(temperature=0))
    assert g.tolist() == [[0, 0, 0, 1]]


@pytest.mark.parametrize(
    "kwargs, key",
    [({"cfg_scale": -1.0}, "cfg_scale"), ({"top_k": 10_000}, "top_k"), ({"temperature": -0.5}, "temperature")],
)
def test_bad_sampling_settings_name_the_key(random_backbone, prompts, kwargs, key):
    with pytest.raises(ValueError, match=key):
        ar_generate(random_backbone, prompts, SamplingConfig(**kwargs))


def test_empty_prompt_list_is_an_error(random_backbone):
    with pytest.raises(ValueError, match="prompts"):
        ar_generate(random_backbone, [], SamplingConfig())
