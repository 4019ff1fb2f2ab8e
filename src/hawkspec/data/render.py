"""Lay out small images with their captions in a grid, for eyeballing samples."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 4  # px between cells and around the border
LINE_SPACING = 2  # extra px between caption lines


def _to_hwc_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Converts a (3, H, W) tensor / array or an (H, W, 3) array to an (H, W, 3) uint8 array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a 3-d image, got shape {image.shape}")
    if image.shape[0] == 3 and image.shape[-1] != 3:  # channels first
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return image


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """Wraps ``text`` with textwrap so that every line is at most ``max_width`` px wide."""
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    width_chars = max(1, int(max_width * len(alphabet) / max(1.0, font.getlength(alphabet))))
    while True:
        lines = textwrap.wrap(text, width=width_chars)
        if width_chars == 1 or all(font.getlength(line) <= max_width for line in lines):
            return lines
        width_chars -= 1


def image_grid(
    images: Sequence[np.ndarray | torch.Tensor],
    captions: Sequence[str] | None = None,
    ncols: int = 4,
    scale: int = 4,
) -> Image.Image:
    """Tiles images into a grid, each upscaled and with its caption wrapped underneath.

    Args:
        images: uint8 images, each a (3, H, W) tensor/array or an (H, W, 3) array.
        captions: One caption per image, or None for no text.
        ncols: Number of columns (fewer if there are fewer images).
        scale: Integer nearest-neighbour upscaling factor.

    Returns:
        An RGB image of width ``ncols * W * scale + (ncols + 1) * PAD`` on a white background.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    arrays = [_to_hwc_uint8(image) for image in images]
    cell_h = max(a.shape[0] for a in arrays) * scale
    cell_w = max(a.shape[1] for a in arrays) * scale
    ncols = min(ncols, len(arrays))
    nrows = -(-len(arrays) // ncols)

    font = ImageFont.load_default()
    wrapped: list[list[str]] = [[] for _ in arrays]
    text_h = line_h = 0
    if captions is not None:
        wrapped = [_wrap(text, font, cell_w) for text in captions]
        line_h = font.getbbox("Ag")[3] + LINE_SPACING  # bottom of the tallest glyphs
        text_h = max(len(lines) for lines in wrapped) * line_h + PAD

    grid = Image.new(
        "RGB",
        (ncols * cell_w + (ncols + 1) * PAD, nrows * (cell_h + text_h) + (nrows + 1) * PAD),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for k, (array, lines) in enumerate(zip(arrays, wrapped)):
        row, col = divmod(k, ncols)
        x = PAD + col * (cell_w + PAD)
        y = PAD + row * (cell_h + text_h + PAD)
        upscaled = array.repeat(scale, axis=0).repeat(scale, axis=1)  # (H*scale, W*scale, 3)
        grid.paste(Image.fromarray(upscaled), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell_h + PAD // 2 + j * line_h), line, fill="black", font=font)
    return grid


def save_grid(
    path: str | os.PathLike,
    images: Sequence[np.ndarray | torch.Tensor],
    captions: Sequence[str] | None = None,
    ncols: int = 4,
    scale: int = 4,
) -> Path:
    """Builds :func:`image_grid` and saves it to ``path`` (format from the extension).

    Parent folders are created as needed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, captions, ncols=ncols, scale=scale).save(path)
    return path
