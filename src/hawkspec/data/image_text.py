"""Real training images with captions for the hidden-state cache (``cache.source=images``).

The Hawk paper trains its heads on 6,000 LAION-aesthetic image-caption pairs run teacher-forced through the frozen
model; this reads such data from local disk, in one of two layouts (``cache.images``):

* **LAION-style pairs** (``path`` only): every image file ``x.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` under
  ``path`` (recursively, e.g. an extracted img2dataset / WebDataset folder) with its caption in ``x.txt`` beside
  it. Images without a caption file are skipped (counted in the log).
* **COCO** (``path`` = the image folder, ``coco_annotations`` = ``captions_train2017.json``): one sample per image,
  its caption the first annotation (lowest id) of that image.

Each image is made RGB (transparency blended onto white, as the official tokenizer does), shrunk by halves with a
box filter while at least twice the target, resized (bicubic) so it covers the backbone's ``image_size`` and
center-cropped to it (the official Lumina-mGPT crop takes a random offset and picks among aspect ratios; we take
the center at the configured resolution), then tokenized by the backbone's own VQ encoder
(:meth:`~hawkspec.backbones.base.Backbone.encode_images`).

Sample order: the pairs, sorted by path, are shuffled once with ``cache.images.seed``; train sample ``i`` is pair
``order[i]`` and val sample ``i`` is pair ``order[N - 1 - i]``, so the splits never share an image as long as
``cache.num_samples + cache.val_samples <= N`` (checked when the plans are made).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class ImageTextPairs:
    """An ordered list of (image file, caption)."""

    images: tuple[str, ...]
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def _scan_folder(root: Path) -> ImageTextPairs:
    images, captions, missing = [], [], 0
    for f in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = f.with_suffix(".txt")
        if not txt.is_file():
            missing += 1
            continue
        text = " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
        if text:
            images.append(str(f))
            captions.append(text)
        else:
            missing += 1
    if missing:
        log.info("%s: %d images without a (non-empty) caption .txt were skipped", root, missing)
    return ImageTextPairs(tuple(images), tuple(captions))


def _read_coco(root: Path, annotations: Path) -> ImageTextPairs:
    data = json.loads(annotations.read_text())
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"cache.images.coco_annotations={annotations} is not a COCO captions file "
                         "(needs 'images' and 'annotations')")
    first: dict[int, tuple[int, str]] = {}
    for a in data["annotations"]:
        cap = " ".join(str(a.get("caption", "")).split())
        if cap and (a["image_id"] not in first or a["id"] < first[a["image_id"]][0]):
            first[a["image_id"]] = (a["id"], cap)
    images, captions = [], []
    for im in sorted(data["images"], key=lambda m: m["file_name"]):
        if im["id"] in first:
            images.append(str(root / im["file_name"]))
            captions.append(first[im["id"]][1])
    return ImageTextPairs(tuple(images), tuple(captions))


@functools.lru_cache(maxsize=4)
def load_pairs(path: str, coco_annotations: str | None = None) -> ImageTextPairs:
    """The (image, caption) pairs of ``cache.images`` (cached per process)."""
    if not path:
        raise ValueError("cache.source=images needs cache.images.path: a folder of images with captions "
                         "(x.jpg + x.txt, LAION-style) or COCO's train2017 image folder")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"cache.images.path={path} is not a folder")
    if coco_annotations:
        ann = Path(coco_annotations).expanduser()
        if not ann.is_file():
            raise FileNotFoundError(f"cache.images.coco_annotations={coco_annotations} does not exist")
        pairs = _read_coco(root, ann)
    else:
        pairs = _scan_folder(root)
    if not len(pairs):
        raise ValueError(f"cache.images.path={path} holds no image with a caption (x.jpg + x.txt, or COCO with "
                         "cache.images.coco_annotations)")
    return pairs


def sample_order(n: int, seed: int) -> np.ndarray:
    """The shuffled order of ``n`` pairs under ``seed``."""
    return np.random.default_rng(seed).permutation(n)


def check_splits(images: dict, num_samples: int, val_samples: int) -> None:
    """Raise when the splits would need more pairs than the folder holds (they could not stay disjoint)."""
    pairs = load_pairs(images.get("path"), images.get("coco_annotations"))
    if num_samples + val_samples > len(pairs):
        raise ValueError(f"cache.num_samples={num_samples} + cache.val_samples={val_samples} exceed the "
                         f"{len(pairs)} captioned images of cache.images.path={images.get('path')}")


def pair_indices(images: dict, split: str, start: int, stop: int) -> list[int]:
    """Pair indices of samples ``start .. stop-1`` of ``split`` (train from the front of the order, val from the
    back)."""
    pairs = load_pairs(images.get("path"), images.get("coco_annotations"))
    order = sample_order(len(pairs), int(images.get("seed") or 0))
    n = len(order)
    if stop > n:
        raise ValueError(f"{split} sample {stop - 1} needs more than the {n} captioned images of "
                         f"cache.images.path={images.get('path')}")
    return [int(order[i]) if split != "val" else int(order[n - 1 - i]) for i in range(start, stop)]


def captions_for(images: dict, split: str, start: int, stop: int) -> list[str]:
    pairs = load_pairs(images.get("path"), images.get("coco_annotations"))
    return [pairs.captions[i] for i in pair_indices(images, split, start, stop)]


def load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 of the image at ``path``, RGB, resized to cover ``size`` = (H, W) and center-cropped."""
    from PIL import Image

    height, width = size
    with Image.open(path) as im:
        im.load()
        if im.mode != "RGB":
            rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
            alpha = rgba[..., 3:] / 255.0
            im = Image.fromarray((rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8), "RGB")
        while im.size[0] >= 2 * width and im.size[1] >= 2 * height:
            im = im.resize((im.size[0] // 2, im.size[1] // 2), resample=Image.BOX)
        scale = max(width / im.size[0], height / im.size[1])
        im = im.resize((max(width, round(im.size[0] * scale)), max(height, round(im.size[1] * scale))),
                       resample=Image.BICUBIC)
        left, top = (im.size[0] - width) // 2, (im.size[1] - height) // 2
        im = im.crop((left, top, left + width, top + height))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def image_codes(backbone, images: dict, split: str, start: int, stop: int) -> torch.Tensor:
    """(stop - start, rows, cols) codes of the split's images, tokenized by the backbone's own VQ encoder."""
    pairs = load_pairs(images.get("path"), images.get("coco_annotations"))
    idx = pair_indices(images, split, start, stop)
    batch = torch.stack([load_image(pairs.images[i], tuple(backbone.image_size)) for i in idx])
    return backbone.encode_images(batch)
