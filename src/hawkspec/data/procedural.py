"""A procedural, seeded text-to-image dataset (no downloads).

Every sample is a single coloured shape on a textured background, described by a
caption from a tiny fixed grammar, e.g.::

    a large red circle at the top left on a blue gradient background
    a small green cross in the center on a plain white background

Everything is deterministic: item ``i`` of ``ProceduralDataset(size, seed)`` depends only
on ``(seed, i)``, and a :class:`Scene` renders to the same pixels every time because all
texture randomness comes from ``numpy.random.default_rng(scene.seed)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "left", "right", "top", "bottom", "center",
    "top left", "top right", "bottom left", "bottom right",
)
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "noise", "plain")

# Object side length as a fraction of the image side.
SIZE_FRACTION: dict[str, float] = {"small": 0.25, "large": 0.45}
# Object centre (x, y) as fractions of the image side, before jitter.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
JITTER: float = 0.04  # max centre jitter, fraction of the image side
SHADE_STRENGTH: float = 0.45  # how far the secondary background shade moves from bg_color


@dataclass(frozen=True)
class Scene:
    """Everything needed to caption and render one image.

    Attributes:
        shape: One of :data:`SHAPES`.
        color: Object colour, a key of :data:`COLORS`.
        size: ``"small"`` or ``"large"``.
        position: One of :data:`POSITIONS`.
        background: One of :data:`BACKGROUNDS`.
        bg_color: Background colour, a key of :data:`COLORS`, never equal to ``color``.
        seed: Seed for the texture, jitter and noise of :func:`render`.
    """

    shape: str
    color: str
    size: str
    position: str
    background: str
    bg_color: str
    seed: int

    def __post_init__(self) -> None:
        checks = (
            ("shape", self.shape, SHAPES),
            ("color", self.color, COLOR_NAMES),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("background", self.background, BACKGROUNDS),
            ("bg_color", self.bg_color, COLOR_NAMES),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"Scene.{name}={value!r} is not one of {allowed}")
        if self.bg_color == self.color:
            raise ValueError(f"Scene.bg_color must differ from color (both {self.color!r})")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Scene:
        """Builds a scene from a mapping such as ``dataclasses.asdict(scene)``."""
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})


def sample_scene(rng: np.random.Generator) -> Scene:
    """Samples a scene uniformly over all fields (``bg_color`` uniform over colours != ``color``).

    Args:
        rng: Source of randomness.

    Returns:
        A new :class:`Scene`.
    """
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    other_colors = [c for c in COLOR_NAMES if c != color]
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=color,
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        bg_color=other_colors[rng.integers(len(other_colors))],
        seed=int(rng.integers(2**31 - 1)),
    )


# ----------------------------------------------------------------------------- captions


def _position_phrase(position: str) -> str:
    """E.g. ``"in the center"``, ``"on the left"``, ``"at the top left"``."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _background_phrase(background: str, bg_color: str) -> str:
    """E.g. ``"plain white"``, ``"noisy blue"``, ``"red gradient"``, ``"black striped"``."""
    return {
        "plain": f"plain {bg_color}",
        "noise": f"noisy {bg_color}",
        "gradient": f"{bg_color} gradient",
        "stripes": f"{bg_color} striped",
    }[background]


def caption(scene: Scene) -> str:
    """Describes a scene with the fixed grammar (lower case, single spaces, no punctuation).

    ``"a {size} {color} {shape} {in|on|at} the {position} on a {background phrase} background"``

    Args:
        scene: The scene to describe.

    Returns:
        The caption, e.g. ``"a large red circle at the top left on a blue gradient background"``.
    """
    return (
        f"a {scene.size} {scene.color} {scene.shape} {_position_phrase(scene.position)} "
        f"on a {_background_phrase(scene.background, scene.bg_color)} background"
    )


def _vocab_words() -> tuple[str, ...]:
    words = {"a", "on", "background", *SIZES, *COLOR_NAMES, *SHAPES}
    for position in POSITIONS:
        words.update(_position_phrase(position).split())
    for background in BACKGROUNDS:
        for bg_color in COLOR_NAMES:
            words.update(_background_phrase(background, bg_color).split())
    return tuple(sorted(words))


VOCAB_WORDS: tuple[str, ...] = _vocab_words()
"""Every word :func:`caption` can produce, sorted and deduplicated."""


def attributes(scene: Scene | Mapping[str, Any]) -> dict[str, str]:
    """The object attributes an attribute classifier predicts.

    Args:
        scene: A :class:`Scene` or a mapping with its fields (as in a dataset item's ``"scene"``).

    Returns:
        ``{"shape": ..., "color": ..., "size": ..., "position": ...}``.
    """
    fields = scene if isinstance(scene, Mapping) else dataclasses.asdict(scene)
    return {key: fields[key] for key in ("shape", "color", "size", "position")}


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each (H, W) float32, in pixel units."""
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.flags.writeable = False
    xx.flags.writeable = False
    return xx, yy


def _shade(rgb: np.ndarray) -> np.ndarray:
    """A darker version of a light colour or a lighter version of a dark one. (3,) float32."""
    luminance = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    target = 0.0 if luminance > 128 else 255.0
    return rgb + SHADE_STRENGTH * (target - rgb)


def _upsample_bilinear(low: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsamples (g, g, C) to (size, size, C) with separable interpolation matrices."""
    g = low.shape[0]
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * g - 0.5  # (size,) in low-res coords
    pos = np.clip(pos, 0, g - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), g - 2)
    frac = pos - lo
    interp = np.zeros((size, g), dtype=np.float32)  # (size, g)
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    planes = low.transpose(2, 0, 1)  # (C, g, g)
    rows = interp @ planes  # (C, size, g)
    full = rows @ interp.T  # (C, size, size)
    return full.transpose(1, 2, 0)


def _render_background(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 background in [0, 255] units (not yet clipped)."""
    s = image_size
    xx, yy = _pixel_grid(s)
    base = np.asarray(COLORS[scene.bg_color], dtype=np.float32)  # (3,)
    shade = _shade(base)  # (3,)

    if scene.background == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        cos, sin = np.cos(angle), np.sin(angle)
        t = ((xx - s / 2) * cos + (yy - s / 2) * sin) / (s * (abs(cos) + abs(sin))) + 0.5  # (H, W) in [0, 1]
        image = base + t[..., None] * (shade - base)
        return image + rng.normal(0, 6, size=(s, s, 3))
    if scene.background == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 12)
        phase = rng.uniform(0, period)
        proj = xx * np.cos(angle) + yy * np.sin(angle) + phase  # (H, W)
        on_stripe = (proj % period) < period / 2
        image = np.where(on_stripe[..., None], shade, base)
        return image + rng.normal(0, 3, size=(s, s, 3))
    if scene.background == "noise":
        cells = int(rng.integers(4, 9))
        low = rng.normal(0, 30, size=(cells, cells, 3)).astype(np.float32)
        smooth = _upsample_bilinear(low, s)  # (H, W, 3)
        return base + smooth + rng.normal(0, 4, size=(s, s, 3))
    # plain
    return base + rng.normal(0, 4, size=(s, s, 3))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean (H, W) mask of a shape with half-size ``r`` given offsets from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= r
    if shape == "triangle":  # apex at the top, base at the bottom
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "ring":  # annulus, thickness 30% of the radius
        dist2 = dx**2 + dy**2
        return (dist2 <= r**2) & (dist2 >= (0.7 * r) ** 2)
    if shape == "cross":  # plus sign, arm thickness 30% of the size
        arm = 0.3 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(scene: Scene, image_size: int = 48) -> np.ndarray:
    """The boolean (H, W) mask of the object exactly as :func:`render` draws it."""
    return _object_mask(scene, image_size, np.random.default_rng(scene.seed))


def _object_mask(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    s = image_size
    xx, yy = _pixel_grid(s)
    half = SIZE_FRACTION[scene.size] / 2  # half side, fraction of image
    fx, fy = POSITION_CENTERS[scene.position]
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    # Keep the object inside the image.
    cx = np.clip(fx + jitter[0], half, 1 - half) * s
    cy = np.clip(fy + jitter[1], half, 1 - half) * s
    return _shape_mask(scene.shape, xx - cx, yy - cy, half * s)


def render(scene: Scene, image_size: int = 48) -> np.ndarray:
    """Renders a scene.

    Args:
        scene: The scene to draw.
        image_size: Side of the square output image in pixels.

    Returns:
        uint8 array of shape (H, W, 3) with H = W = ``image_size``.
    """
    rng = np.random.default_rng(scene.seed)
    # Draw the object placement first so it does not depend on the background type.
    mask = _object_mask(scene, image_size, rng)  # (H, W) bool
    image = _render_background(scene, image_size, rng)  # (H, W, 3) float
    color = np.asarray(COLORS[scene.color], dtype=np.float32)
    object_pixels = color + rng.normal(0, 3, size=image.shape)
    image = np.where(mask[..., None], object_pixels, image)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- dataset


class ProceduralDataset(Dataset):
    """A fixed-size, deterministic dataset of procedural captioned images.

    Item ``i`` is generated from ``numpy.random.default_rng([seed, i])``, so it does not
    depend on the order of access, the number of workers or the other items.

    Each item is a dict::

        {"image": uint8 tensor (3, H, W), "caption": str, "scene": dict of Scene fields}

    Args:
        size: Number of items.
        seed: Dataset seed; different seeds give independent datasets.
        image_size: Side of the square images in pixels.
    """

    def __init__(self, size: int, seed: int = 0, image_size: int = 48) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self.seed = seed
        self.image_size = image_size

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        """The scene of item ``index`` (cheap: does not render)."""
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for dataset of size {self.size}")
        return sample_scene(np.random.default_rng([self.seed, index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        image = torch.from_numpy(render(scene, self.image_size)).permute(2, 0, 1).contiguous()  # (3, H, W)
        return {"image": image, "caption": caption(scene), "scene": dataclasses.asdict(scene)}

    @staticmethod
    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Stacks images to (B, 3, H, W); keeps captions and scenes as lists."""
        return {
            "image": torch.stack([item["image"] for item in batch]),
            "caption": [item["caption"] for item in batch],
            "scene": [item["scene"] for item in batch],
        }
