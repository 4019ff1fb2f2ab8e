"""Tests for the procedural text-to-image dataset."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hawkspec.data.procedural import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    VOCAB_WORDS,
    ProceduralDataset,
    Scene,
    attributes,
    caption,
    object_mask,
    render,
    sample_scene,
)


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_item_is_deterministic_in_seed_and_index():
    a, b = ProceduralDataset(10, seed=3), ProceduralDataset(10, seed=3)
    for i in (0, 7):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
        assert a[i]["scene"] == b[i]["scene"]
    assert ProceduralDataset(10, seed=4)[0]["caption"] != a[0]["caption"] or not torch.equal(
        ProceduralDataset(10, seed=4)[0]["image"], a[0]["image"]
    )


def test_captions_use_only_vocab_words():
    assert list(VOCAB_WORDS) == sorted(set(VOCAB_WORDS))
    vocab = set(VOCAB_WORDS)
    used = set()
    for scene in _scenes(500):
        text = caption(scene)
        assert text == text.lower() and "  " not in text and text.strip() == text
        assert text.replace(" ", "").isalpha()
        words = text.split(" ")
        assert set(words) <= vocab, text
        used.update(words)
    assert used == vocab  # 500 scenes hit every word


def test_caption_examples():
    scene = Scene("circle", "red", "large", "top left", "gradient", "blue", 0)
    assert caption(scene) == "a large red circle at the top left on a blue gradient background"
    scene = Scene("cross", "green", "small", "center", "plain", "white", 0)
    assert caption(scene) == "a small green cross in the center on a plain white background"
    scene = Scene("ring", "black", "small", "left", "noise", "yellow", 0)
    assert caption(scene) == "a small black ring on the left on a noisy yellow background"
    scene = Scene("square", "white", "large", "bottom", "stripes", "purple", 0)
    assert caption(scene) == "a large white square at the bottom on a purple striped background"


def test_sampling_covers_fields_and_bg_differs():
    scenes = _scenes(500)
    assert all(s.bg_color != s.color for s in scenes)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.position for s in scenes} == set(POSITIONS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.color for s in scenes} == set(COLORS)
    with pytest.raises(ValueError):
        Scene("circle", "red", "large", "center", "plain", "red", 0)


def test_render_dtype_shape_and_texture():
    for scene in _scenes(40):
        image = render(scene, image_size=32)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        background = image[~object_mask(scene, 32)]  # (n, 3)
        assert background.astype(float).std(0).mean() > 1.0  # never a flat colour
    assert render(_scenes(1)[0]).shape == (48, 48, 3)


@pytest.mark.parametrize("color", ["red", "blue", "white", "black"])
def test_object_colour_appears_at_its_position(color):
    bg = "yellow" if color != "yellow" else "blue"
    scene = Scene("circle", color, "large", "center", "plain", bg, seed=5)
    image = render(scene).astype(float)
    centre = image[20:28, 20:28].reshape(-1, 3).mean(0)
    assert np.abs(centre - COLORS[color]).max() < 10
    corner = image[:6, :6].reshape(-1, 3).mean(0)
    assert np.abs(corner - COLORS[bg]).max() < 10

    scene = dataclasses.replace(scene, position="top left", size="small")
    mask = object_mask(scene)
    ys, xs = np.nonzero(mask)
    assert ys.mean() < 20 and xs.mean() < 20
    assert np.abs(render(scene)[mask].astype(float).mean(0) - COLORS[color]).max() < 10


def test_dataset_items_and_collate():
    ds = ProceduralDataset(6, seed=1, image_size=32)
    item = ds[2]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 32, 32)
    assert item["caption"] == caption(Scene.from_dict(item["scene"]))
    assert attributes(item["scene"]) == attributes(Scene.from_dict(item["scene"]))
    assert set(attributes(item["scene"])) == {"shape", "color", "size", "position"}
    with pytest.raises(IndexError):
        ds[6]
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ProceduralDataset.collate)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    default = next(iter(DataLoader(ds, batch_size=3)))  # default collation must not choke
    assert default["image"].shape == (3, 3, 32, 32)
