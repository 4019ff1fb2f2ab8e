"""Procedural captions read back into their attributes (what prompt alignment compares with)."""

import dataclasses

import numpy as np
import pytest

from hawkspec.data.procedural import caption, sample_scene
from hawkspec.metrics.captions import parse_caption


def test_parse_inverts_the_grammar_for_many_scenes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = sample_scene(rng)
        fields = dataclasses.asdict(scene)
        want = {k: fields[k] for k in ("shape", "color", "size", "position", "background", "bg_color")}
        assert parse_caption(caption(scene)) == want, caption(scene)


def test_parse_tolerates_case_spaces_and_a_full_stop():
    got = parse_caption("  A large  RED circle at the top left on a blue gradient background. ")
    assert got == {"shape": "circle", "color": "red", "size": "large", "position": "top left",
                   "background": "gradient", "bg_color": "blue"}


@pytest.mark.parametrize("text", ["a photo of a cat", "a large red circle at the top left",
                                  "a huge red circle in the center on a plain white background", ""])
def test_other_text_is_not_a_caption(text):
    assert parse_caption(text) is None
