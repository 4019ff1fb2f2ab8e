"""The project's own image evaluator for the embedded data: an attribute classifier whose penultimate layer is
the feature space of FID and diversity when the standard Inception weights are not available.

It plays Inception's role for the procedural images (a classifier trained on the data, whose pooled features
FID compares), and it also reads back what a caption asked for: the object's shape, colour, size and position,
and the background's kind and colour (the attributes of :class:`hawkspec.data.procedural.Scene`).

Architecture (about 0.21 M parameters, 0.8 MB in fp32)::

    uint8 (B, 3, H, W) -> resize to 48x48 -> (x/255 - 0.5) / 0.25
    conv 4x4/2 (32) BN ReLU -> conv 3x3/2 (64) BN ReLU -> conv 3x3/2 (64) BN ReLU     # (B, 64, 6, 6)
    flatten -> linear (feature_dim) ReLU                                             # (B, F)
    one linear head per attribute                                                    # logits, (B, classes)

The FID / diversity features are the (B, F) layer divided by ``feature_scale``, its root-mean-square value on
held-out renders (set after training), so that the features are of order 1 and FIDs of readable size.

The weights are written by ``hawkspec-quality`` (``conf/quality.yaml``) into a folder holding
``evaluator.safetensors`` and ``evaluator.json`` (classes, training settings, held-out accuracy); the shipped
copy is ``src/hawkspec/assets/evaluator``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from hawkspec.data.procedural import BACKGROUNDS, COLOR_NAMES, POSITIONS, SHAPES, SIZES
from hawkspec.io import load_safetensors

#: Name written beside every FID computed in this feature space.
EXTRACTOR_NAME = "hawkspec-tiny-extractor"
#: The attributes the classifier predicts, each with its classes (the Scene field of the same name).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "bg_color": COLOR_NAMES,
}
DEFAULT_EVALUATOR = Path(__file__).resolve().parent.parent / "assets" / "evaluator"
WEIGHTS, META = "evaluator.safetensors", "evaluator.json"


class TinyEvaluator(nn.Module):
    """Attribute classifier + feature extractor for the procedural images (see the module docstring).

    Args:
        feature_dim: Size of the feature vector (the FID feature space).
        image_size: Side the input is resized to.
        attributes: Attribute name -> class names (defaults to :data:`ATTRIBUTES`).
    """

    def __init__(self, feature_dim: int = 64, image_size: int = 48,
                 attributes: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.attributes = {k: tuple(v) for k, v in (attributes or ATTRIBUTES).items()}
        side = image_size // 8
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * side * side, feature_dim), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.attributes.items()})
        self.register_buffer("feature_scale", torch.ones(()))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> normalised float (B, 3, S, S), S = ``image_size``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images in [0, 255], got {images.dtype}")
        x = images.to(self.heads[next(iter(self.heads))].weight.device).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - 0.5) / 0.25

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the FID / diversity features (B, feature_dim): non-negative, about unit RMS."""
        return self.trunk(self.prepare(images)) / self.feature_scale

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) -> {attribute: logits (B, classes)}."""
        h = self.trunk(self.prepare(images))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 512) -> float:
        """Set ``feature_scale`` to the root-mean-square feature value on ``images`` (uint8); returns it."""
        self.eval()
        total, count = 0.0, 0
        for i in range(0, len(images), batch_size):
            h = self.trunk(self.prepare(images[i : i + batch_size]))
            total += float(h.pow(2).sum())
            count += h.numel()
        self.feature_scale.fill_(max(total / count, 1e-12) ** 0.5)
        return float(self.feature_scale)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """The most likely class name of every attribute, per image."""
        out: dict[str, list[str]] = {k: [] for k in self.attributes}
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size])
            for k, v in logits.items():
                out[k] += [self.attributes[k][j] for j in v.argmax(-1).tolist()]
        return out

    # ------------------------------------------------------------------------------------------ persistence
    def revision(self) -> str:
        """A short hash of the weights (keys the cached reference statistics)."""
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path, report: dict | None = None) -> Path:
        """Write ``evaluator.safetensors`` and ``evaluator.json`` (architecture, classes, ``report``) to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        meta = {"name": EXTRACTOR_NAME, "feature_dim": self.feature_dim, "image_size": self.image_size,
                "attributes": {k: list(v) for k, v in self.attributes.items()}, "revision": self.revision(),
                **(report or {})}
        (path / META).write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path | None = None, key: str = "eval.quality.evaluator") -> "TinyEvaluator":
        """Load a folder written by :meth:`save`; ``None`` loads the evaluator shipped with hawkspec.

        Args:
            path: The folder.
            key: The config key that named ``path`` (quoted in errors).
        """
        folder = Path(path) if path else DEFAULT_EVALUATOR
        for name in (WEIGHTS, META):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"evaluator is missing {folder / name}; set `{key}` to a folder written by `hawkspec-quality` "
                    "(or null for the shipped one; `hawkspec-quality export_dir=src/hawkspec/assets/evaluator` "
                    "rebuilds that)"
                )
        meta = json.loads((folder / META).read_text())
        model = cls(meta["feature_dim"], meta["image_size"], {k: tuple(v) for k, v in meta["attributes"].items()})
        model.load_state_dict(load_safetensors(folder / WEIGHTS, f"the evaluator (`{key}`)", (
            "Remake it: `hawkspec-quality export_dir=src/hawkspec/assets/evaluator` rebuilds the shipped one; for your "
            f"own, rerun the `hawkspec-quality` that exported it, or set `{key}` to an intact folder (null: shipped)")))
        model.meta = meta
        return model.eval()


class FeatureModule(nn.Module):
    """The evaluator's feature layer as a torchmetrics FID ``feature`` module: uint8 (B, 3, H, W) -> (B, F)."""

    def __init__(self, evaluator: TinyEvaluator) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.num_features = evaluator.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.features(images)

    def train(self, mode: bool = True) -> "FeatureModule":
        return super().train(False)  # frozen: BatchNorm keeps its running statistics
