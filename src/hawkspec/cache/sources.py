"""Where the cached image sequences come from: the backbone's own samples, or tokenized procedural images.

Sample ``i`` of a split with seed ``seed`` always gets the caption of procedural item ``(seed, i)``
(:class:`hawkspec.data.procedural.ProceduralDataset`), whatever the source.

* ``self`` (self-distillation, the default): the backbone samples the image for the caption with plain AR
  decoding under the ``sampling`` config (:func:`hawkspec.decoding.ar.ar_generate`), a batch at a time.
  Draft heads then learn the distribution they will have to match at decoding time.
* ``dataset``: the procedural image itself, tokenized with the backbone's own VQ encoder
  (:meth:`~hawkspec.backbones.base.Backbone.encode_images`).
"""

from __future__ import annotations

import torch

from hawkspec.backbones.base import Backbone
from hawkspec.data.procedural import ProceduralDataset, caption
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig


def procedural_captions(seed: int, start: int, stop: int) -> list[str]:
    """Captions of procedural items ``start .. stop-1`` of the dataset with ``seed`` (no rendering)."""
    ds = ProceduralDataset(stop, seed=seed)
    return [caption(ds.scene(i)) for i in range(start, stop)]


def self_codes(
    backbone: Backbone, prompts: list[str], sampling: SamplingConfig, generator: torch.Generator
) -> torch.Tensor:
    """(B, rows, cols) codes the backbone samples for ``prompts`` (one batched AR run)."""
    return ar_generate(backbone, prompts, sampling, generator).codes


def dataset_codes(backbone: Backbone, seed: int, start: int, stop: int) -> torch.Tensor:
    """(stop - start, rows, cols) codes of the rendered procedural images, tokenized by the backbone's VQ."""
    height, width = backbone.image_size
    if height != width:
        raise ValueError(f"procedural images are square; the backbone's images are {height}x{width}")
    ds = ProceduralDataset(stop, seed=seed, image_size=height)
    images = torch.stack([ds[i]["image"] for i in range(start, stop)])  # (B, 3, H, W) uint8
    return backbone.encode_images(images)  # (B, rows, cols)
