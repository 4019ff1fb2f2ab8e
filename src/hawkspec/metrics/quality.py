"""Image-quality metrics, each defined once (all computed with torchmetrics where it has the metric).

* ``fid``: Fréchet distance between the features of the generated images and of a fixed *reference* set of real
  images (torchmetrics ``FrechetInceptionDistance``). ``fid_features`` names the feature space, and every output
  carries it: ``"inception"`` (the standard 2048-d pool features, when the weights file is on disk and
  ``torch-fidelity`` is installed) or ``"hawkspec-tiny-extractor"`` (the 64-d feature layer of this project's
  evaluator, :mod:`hawkspec.metrics.evaluator`). The two are not comparable with each other, nor with papers'
  numbers on other data; compare decoders with each other and with the noise floor.
* ``diversity``: ``sqrt(tr Σ_gen / tr Σ_ref)`` in the same feature space — the root-mean-square distance between
  two generated images relative to that between two reference images (mean squared pairwise distance = 2 tr Σ).
  1.0: as spread as the real data; lower: collapsed.
* ``alignment``: how often an image shows what its caption asks for — the evaluator's predicted colour, shape and
  position against the caption's, averaged over those three attributes and the images (captions of the
  procedural grammar only; ``null`` otherwise). ``alignment_<attribute>`` for each attribute the classifier reads.
* ``clip_score``: torchmetrics ``CLIPScore`` (100 × mean cosine, floored at 0) with a local CLIP model, when one is
  configured (``eval.quality.clip_model``); for real backbones.
* The *noise floor* of each figure: the same metric on AR with another seed (same prompts, same number of
  images); ``|AR(seed') − AR(seed)|`` is the change sampling noise alone causes, and ``fid_ar_vs_ar`` the FID
  between the two AR sets.

Reference statistics (the real images' feature sums) are computed once per extractor and reference set and
cached on disk (``eval.quality.reference.cache_dir``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hawkspec.data.procedural import ProceduralDataset, render
from hawkspec.metrics.captions import parse_caption
from hawkspec.metrics.evaluator import EXTRACTOR_NAME, FeatureModule, TinyEvaluator

log = logging.getLogger("hawkspec")

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
FID_FEATURE_MODES = ("auto", "inception", "tiny")
ALIGNMENT_ATTRIBUTES = ("color", "shape", "position")
QUALITY_KEYS = ("fid", "diversity", "alignment", "clip_score")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class QualitySettings:
    """``eval.quality`` (see ``conf/eval.yaml``)."""

    enabled: bool = True
    fid_features: str = "auto"
    inception_weights: str | None = None
    clip_model: str | None = None
    evaluator: str | None = None
    noise_floor: bool = True
    batch_size: int = 64
    reference: dict = field(default_factory=dict)

    def validate(self, num_images: int) -> "QualitySettings":
        if self.fid_features not in FID_FEATURE_MODES:
            raise ValueError(f"eval.quality.fid_features={self.fid_features!r}: choose one of {FID_FEATURE_MODES}")
        if num_images < 2:
            raise ValueError(f"FID needs at least 2 images per decoder: set eval.num_prompts >= 2 (got {num_images}) "
                             "or eval.quality.enabled=false")
        if self.batch_size < 1:
            raise ValueError(f"eval.quality.batch_size must be >= 1, got {self.batch_size}")
        ref = self.reference
        if not ref.get("image_dir") and int(ref.get("num_images", 0)) < 2:
            raise ValueError("eval.quality.reference.num_images must be >= 2 (the real images FID compares with)")
        if ref.get("image_dir") and not Path(ref["image_dir"]).is_dir():
            raise FileNotFoundError(f"eval.quality.reference.image_dir={ref['image_dir']} is not a folder")
        inception_weights_path(self.inception_weights)  # a configured file must exist
        if self.clip_model and not (Path(self.clip_model).expanduser() / "config.json").is_file():
            raise FileNotFoundError(_clip_missing(self.clip_model))
        return self


# ---------------------------------------------------------------------------------------------- Inception / CLIP
def inception_weights_path(path: str | None) -> Path | None:
    """The FID Inception weights file: ``path`` (which must exist), else the torch hub cache's copy, else None."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"eval.quality.inception_weights={path} does not exist: point it at torch-fidelity's "
                f"{INCEPTION_FILE}, or set it to null to look in the torch hub cache"
            )
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


class _ProjectedCLIP(nn.Module):
    """A transformers ``CLIPModel`` whose ``get_*_features`` return the projected embedding tensor.

    transformers 5 returns a ``BaseModelOutputWithPooling`` there, which torchmetrics 1.9's CLIPScore cannot read
    (torchmetrics issue #3407, fixed upstream after 1.9.0).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _clip_missing(path: str) -> str:
    return (f"eval.quality.clip_model={path} is not a saved CLIP model (no config.json): point it at a folder "
            "written by transformers' save_pretrained (e.g. a local copy of openai/clip-vit-large-patch14)")


def build_clip_score(path: str):
    """torchmetrics ``CLIPScore`` with the CLIP model and processor saved in folder ``path`` (no downloads)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(_clip_missing(path))

    def load():
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise ValueError(f"eval.quality.clip_model={path}: cannot load a CLIP model and processor: {e}") from e
        return _ProjectedCLIP(model.eval()), processor

    return CLIPScore(model_name_or_path=load)


# ---------------------------------------------------------------------------------------------- reference images
def reference_images(ref: dict, side: int, batch: int) -> tuple[dict, Iterator[torch.Tensor]]:
    """The real images FID compares with: a description (the cache key) and a generator of uint8 batches.

    ``ref.image_dir`` (a folder of images, sorted by name, the first ``num_images``, resized to ``side``) when set,
    else ``ref.num_images`` procedural renders of ``ProceduralDataset(num_images, ref.seed, side)``.
    """
    n = int(ref.get("num_images", 0))
    if ref.get("image_dir"):
        folder = Path(ref["image_dir"])
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files = files[:n] if n > 0 else files
        if len(files) < 2:
            raise ValueError(f"eval.quality.reference.image_dir={folder} holds {len(files)} images; FID needs >= 2")
        desc = {"source": "image_dir", "path": str(folder.resolve()), "num_images": len(files), "side": side,
                "files": hashlib.sha1("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode()).hexdigest()}

        def batches():
            from PIL import Image

            for s in range(0, len(files), batch):
                imgs = [np.asarray(Image.open(p).convert("RGB").resize((side, side), Image.BICUBIC))
                        for p in files[s : s + batch]]
                yield torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    else:
        seed = int(ref.get("seed", 0))
        desc = {"source": "procedural", "num_images": n, "seed": seed, "side": side}
        ds = ProceduralDataset(n, seed=seed, image_size=side)

        def batches():
            for s in range(0, n, batch):
                imgs = [render(ds.scene(i), side) for i in range(s, min(n, s + batch))]
                yield torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()

    return desc, batches()


def _trace_cov(total: torch.Tensor, cov_sum: torch.Tensor, n: torch.Tensor) -> float:
    """Trace of the unbiased covariance from FID's running sums: (tr(Σxxᵀ) − n‖μ‖²) / (n − 1)."""
    n = float(n)
    mean = total / n
    return float((torch.trace(cov_sum) - n * mean.dot(mean)) / (n - 1))


# ---------------------------------------------------------------------------------------------- the meter
class QualityMeter:
    """Scores sets of generated images against one reference set (see the module docstring).

    Args:
        settings: ``eval.quality``.
        image_side: Pixel side of the backbone's decoded images (the reference is rendered at this side).
        device: Where features are computed.
    """

    def __init__(self, settings: QualitySettings, image_side: int, device: str | torch.device = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.settings = settings
        self.device = torch.device(device)
        self.batch = settings.batch_size
        self.evaluator = TinyEvaluator.load(settings.evaluator).to(self.device)
        self.fid_features, feature, self.extractor_id = self._feature_space()
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False).to(self.device)
        self.reference = self._reference(image_side)
        self.clip = build_clip_score(settings.clip_model).to(self.device) if settings.clip_model else None
        self._warned_captions = False

    # -- construction
    def _feature_space(self) -> tuple[str, nn.Module | int, str]:
        mode = self.settings.fid_features
        weights = inception_weights_path(self.settings.inception_weights)
        if mode == "inception" or (mode == "auto" and weights is not None and torch_fidelity_available()):
            if weights is None:
                raise FileNotFoundError(
                    f"eval.quality.fid_features=inception but no Inception weights: set eval.quality.inception_weights "
                    f"to torch-fidelity's {INCEPTION_FILE}, or place it in {Path(torch.hub.get_dir()) / 'checkpoints'}"
                )
            if not torch_fidelity_available():
                raise ModuleNotFoundError(
                    "eval.quality.fid_features=inception needs torch-fidelity: pip install -e '.[inception]' "
                    "(with a torchvision matching your torch), or set eval.quality.fid_features=tiny"
                )
            from torchmetrics.image.fid import NoTrainInceptionV3

            log.info("FID features: inception (%s)", weights)
            module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                        feature_extractor_weights_path=str(weights))
            return "inception", module, f"inception-{_file_digest(weights)}"
        why = ("eval.quality.fid_features=tiny" if mode == "tiny" else
               "no Inception weights found" if weights is None else "torch-fidelity is not installed")
        log.info("FID features: %s, the project's evaluator (%s)", EXTRACTOR_NAME, why)
        return EXTRACTOR_NAME, FeatureModule(self.evaluator), f"{EXTRACTOR_NAME}-{self.evaluator.revision()}"

    def _reference(self, side: int) -> dict:
        """Load or compute (and cache) the real images' feature statistics into ``self.fid``."""
        desc, batches = reference_images(self.settings.reference, side, self.batch)
        key = hashlib.sha1(json.dumps({"extractor": self.extractor_id, **desc}, sort_keys=True).encode()).hexdigest()
        cache_dir = Path(self.settings.reference.get("cache_dir") or ".")
        path = cache_dir / f"{self.extractor_id}-{key[:12]}.pt"
        states = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
        if path.is_file():
            saved = torch.load(path, map_location=self.device, weights_only=True)
            for s in states:
                setattr(self.fid, s, saved[s].to(self.device))
            log.info("Reference statistics (%s, %s): loaded from cache %s", self.fid_features, _describe(desc), path)
        else:
            t0 = time.perf_counter()
            for imgs in batches:
                self.fid.update(imgs.to(self.device), real=True)
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({**{s: getattr(self.fid, s).cpu() for s in states}, "meta": {**desc, "extractor": self.extractor_id}}, tmp)
            os.replace(tmp, path)  # atomic: parallel sweep jobs may race to write the same file
            log.info("Reference statistics (%s, %s): computed in %.1f s, cached to %s", self.fid_features,
                     _describe(desc), time.perf_counter() - t0, path)
        trace = _trace_cov(self.fid.real_features_sum, self.fid.real_features_cov_sum, self.fid.real_features_num_samples)
        return {**desc, "extractor": self.extractor_id, "cache": str(path), "trace_cov": trace}

    # -- measuring
    @torch.no_grad()
    def measure(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Every metric of the module docstring for uint8 ``images`` (N, 3, H, W) generated from ``prompts``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        self.fid.reset()  # keeps the reference (reset_real_features=False)
        for s in range(0, len(images), self.batch):
            self.fid.update(images[s : s + self.batch].to(self.device), real=False)
        out = {"fid": float(self.fid.compute()), "fid_features": self.fid_features}
        spread = _trace_cov(self.fid.fake_features_sum, self.fid.fake_features_cov_sum, self.fid.fake_features_num_samples)
        out["diversity"] = math.sqrt(max(spread, 0.0) / self.reference["trace_cov"])
        out.update(self.alignment(images, prompts))
        if self.clip is not None:
            self.clip.reset()
            for s in range(0, len(images), self.batch):
                self.clip.update(images[s : s + self.batch].to(self.device), list(prompts[s : s + self.batch]))
            out["clip_score"] = float(self.clip.compute())
        out["quality_images"] = len(images)
        return out

    def alignment(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """``alignment`` and ``alignment_<attribute>`` over the images whose caption parses (see the module doc)."""
        wanted = [parse_caption(p) for p in prompts]
        keep = [i for i, w in enumerate(wanted) if w is not None]
        if not keep:
            if not self._warned_captions:
                log.info("alignment: no caption follows the procedural grammar; alignment is null (use CLIP score)")
                self._warned_captions = True
            return {"alignment": None}
        if len(keep) < len(prompts) and not self._warned_captions:
            log.warning("alignment: %d of %d captions do not follow the procedural grammar and are skipped",
                        len(prompts) - len(keep), len(prompts))
            self._warned_captions = True
        pred = self.evaluator.predict(images[keep].to(self.device), self.batch)
        out = {}
        for k in self.evaluator.attributes:
            out[f"alignment_{k}"] = float(np.mean([pred[k][j] == wanted[i][k] for j, i in enumerate(keep)]))
        out["alignment"] = float(np.mean([out[f"alignment_{k}"] for k in ALIGNMENT_ATTRIBUTES]))
        return {"alignment": out.pop("alignment"), **out, "alignment_images": len(keep)}

    @torch.no_grad()
    def fid_between(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """FID between two generated sets in the same feature space (no reference)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=self.fid.inception, reset_real_features=True).to(self.device)
        for imgs, real in ((a, True), (b, False)):
            for s in range(0, len(imgs), self.batch):
                fid.update(imgs[s : s + self.batch].to(self.device), real=real)
        return float(fid.compute())

    def describe(self) -> dict:
        """What results.json records about how quality was measured."""
        ev = getattr(self.evaluator, "meta", {})
        return {"fid_features": self.fid_features, "extractor": self.extractor_id, "reference": self.reference,
                "evaluator": {"revision": ev.get("revision"), "val_accuracy_vq": ev.get("val_accuracy", {}).get("vq")},
                "clip_model": self.settings.clip_model, "alignment_attributes": list(ALIGNMENT_ATTRIBUTES)}


def noise_floor(ar: dict, ar_reseed: dict) -> dict:
    """``|AR(seed') − AR(seed)|`` for every numeric quality figure the two share."""
    return {k: abs(ar_reseed[k] - ar[k]) for k in ar
            if isinstance(ar.get(k), float) and isinstance(ar_reseed.get(k), float) and k != "quality_images"}


def _describe(desc: dict) -> str:
    if desc["source"] == "procedural":
        return f"{desc['num_images']} procedural images, seed {desc['seed']}, {desc['side']} px"
    return f"{desc['num_images']} images from {desc['path']} at {desc['side']} px"


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:12]
