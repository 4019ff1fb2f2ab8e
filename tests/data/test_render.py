"""Tests for the image grid helper."""

import numpy as np
import torch

from hawkspec.data.render import PAD, image_grid, save_grid


def test_grid_size_without_captions():
    images = [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in range(5)]
    grid = image_grid(images, None, ncols=2, scale=3)
    assert grid.size == (2 * 24 + 3 * PAD, 3 * 24 + 4 * PAD)
    assert grid.mode == "RGB"


def test_grid_with_captions_and_hwc_arrays(tmp_path):
    images = [np.full((8, 8, 3), 200, dtype=np.uint8) for _ in range(3)]
    captions = ["a large red circle at the top left on a blue gradient background"] * 3
    path = save_grid(tmp_path / "sub" / "grid.png", images, captions, ncols=4, scale=4)
    assert path == tmp_path / "sub" / "grid.png" and path.is_file()
    grid = image_grid(images, captions, ncols=4, scale=4)
    assert grid.width == 3 * 32 + 4 * PAD  # ncols shrinks to the number of images
    assert grid.height > 32 + 2 * PAD  # room for the wrapped caption
    pixels = np.asarray(grid)
    assert (pixels[PAD : PAD + 32, PAD : PAD + 32] == 200).all()  # nearest-neighbour upscale
