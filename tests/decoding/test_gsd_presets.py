"""GSD's embedding filter is on the backbone's own scale: the tiny-model presets' threshold must leave the grouping
room on the shipped model (a retrained model moved its code embeddings from 0.90 to 1.50 apart, and 0.81 silently
turned GSD into the exact rule), and a threshold that keeps almost no pair is reported."""

import hydra
import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.acceptance.grouped import GroupedAcceptance
from hawkspec.testing import compose, the_decoder

TINY_GSD_PRESETS = ["gsd", "hawk_gsd", "eagle_gsd", "hawk_eagle_gsd", "hawk_jacobi_gsd"]


@pytest.fixture(scope="module")
def shipped():
    return TinyBackbone.from_pretrained(path=None)


def preset_rule(name: str, backbone) -> GroupedAcceptance:
    """The acceptance rule of ``conf/decoder/<name>.yaml``, bound to ``backbone``."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"decoder={name}"])
    rule = hydra.utils.instantiate(the_decoder(cfg).acceptance)
    rule.bind(backbone)
    return rule


@pytest.mark.parametrize("name", TINY_GSD_PRESETS)
def test_tiny_presets_embedding_filter_keeps_about_half_the_pairs(shipped, name):
    rule = preset_rule(name, shipped)
    assert 0.3 < rule.embed_keep_fraction < 0.7, (
        f"conf/decoder/{name}.yaml: embed_threshold {rule.embed_threshold} keeps {rule.embed_keep_fraction:.2f} of "
        "the shipped model's code pairs; retune it to the squared median pair distance")
    assert rule.describe()["embed_keep_fraction"] == round(rule.embed_keep_fraction, 3)


def test_grouping_changes_decisions_on_the_shipped_model(shipped):
    """With the preset's filters, a draft gets more mass than r(x) from its group for most target rows."""
    rule = preset_rule("gsd", shipped)
    g = torch.Generator().manual_seed(0)
    r = torch.softmax(torch.randn(64, shipped.num_codes, generator=g), -1)
    x = torch.multinomial(r, 1, generator=g).squeeze(-1)
    grouped = rule.accept_mass(r, x, None)
    exact = r.gather(-1, x[:, None]).squeeze(-1)
    assert (grouped > exact).float().mean() > 0.5


def test_a_threshold_that_keeps_almost_nothing_warns(shipped):
    rule = GroupedAcceptance(group=7, prob_threshold=None, embed_threshold=1e-3, embed_metric="squared")
    with pytest.warns(UserWarning, match="decoder.acceptance.embed_threshold"):
        rule.bind(shipped)
    assert rule.embed_keep_fraction < 0.01
