"""Image-quality metrics, each defined once (all computed with torchmetrics where it has the metric).

* ``fid``: Fréchet distance between the features of the generated images and of a fixed *reference* set of real
  images (torchmetrics ``FrechetInceptionDistance``). ``fid_features`` names the feature space, and every output
  carries it: ``"inception"`` (the standard 2048-d pool features, when the weights file is on disk and
  ``torch-fidelity``'s Inception extractor loads) or ``"hawkspec-tiny-extractor"`` (the 64-d feature layer of this project's
  evaluator, :mod:`hawkspec.metrics.evaluator`). The two are not comparable with each other, nor with papers'
  numbers on other data; compare decoders with each other and with the noise floor.
  ``fid_protocol`` names how images reach the features: center-cropped to the short side and resized to
  ``fid_resize`` px with the ``fid_filter`` (``center-crop-256-lanczos``: LANTERN's protocol, the default with
  Inception; the tiny extractor reads the decoded size). See :mod:`hawkspec.metrics.fid`.
* ``diversity``: ``sqrt(tr Σ_gen / tr Σ_ref)`` in the same feature space — the root-mean-square distance between
  two generated images relative to that between two reference images (mean squared pairwise distance = 2 tr Σ).
  1.0: as spread as the real data; lower: collapsed.
* ``alignment``: how often an image shows what its caption asks for — the evaluator's predicted colour, shape and
  position against the caption's, averaged over those three attributes and the images (captions of the
  procedural grammar only; ``null`` otherwise). ``alignment_<attribute>`` for each attribute the classifier reads.
* CLIP score with a local CLIP model (``eval.quality.clip_model``; for real backbones), in each convention of
  ``eval.quality.clip_conventions``, the convention in the key: ``clip_score_100cos`` (torchmetrics, 100 ×
  max(cos, 0)) and ``clip_cosine_lantern`` (LANTERN, raw cosine with the "A photo depicts " prefix). See
  :mod:`hawkspec.metrics.clip`.
* The *noise floor* of each figure: the same metric on AR with another seed (same prompts, same number of
  images); ``|AR(seed') − AR(seed)|`` is the change sampling noise alone causes, and ``fid_ar_vs_ar`` the FID
  between the two AR sets.

Reference statistics (the real images' feature sums) are computed once per extractor, protocol and reference set
and cached on disk (``eval.quality.reference.cache_dir``).
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
from hawkspec.metrics.clip import CLIP_CONVENTIONS, LANTERN_PREFIX, build_clip_score, clip_cosines, load_clip
from hawkspec.metrics.clip import _clip_missing, _ProjectedCLIP  # noqa: F401  (kept importable from here)
from hawkspec.metrics.fid import (
    FID_FILTERS,
    FID_SIDE,
    InceptionFeatures,
    InceptionUnavailable,
    center_crop_resize,
    center_crop_resize_pil,
    fid_protocol,
    frechet_distance,
    inception_available,
    load_inception_class,
    stats_from_sums,
)
from hawkspec.metrics.evaluator import EXTRACTOR_NAME, FeatureModule, TinyEvaluator

log = logging.getLogger("hawkspec")

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
FID_FEATURE_MODES = ("auto", "inception", "tiny")
ALIGNMENT_ATTRIBUTES = ("color", "shape", "position")
CLIP_DEFINITIONS = {
    "torchmetrics": "torchmetrics CLIPScore: mean of 100 * max(cos(image, caption), 0)",
    "lantern": "LANTERN eval_fid_clip.py: mean raw cos(image, {prefix!r} + caption), text cut to 77 tokens",
}
QUALITY_KEYS = ("fid", "diversity", "alignment", *CLIP_CONVENTIONS.values())
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def caption_alignment(evaluator: TinyEvaluator, images: torch.Tensor, wanted: Sequence[dict[str, str]],
                      batch: int = 256) -> dict:
    """How often the evaluator reads back what each caption asked for.

    Args:
        evaluator: The attribute classifier (:class:`TinyEvaluator`).
        images: uint8 (N, 3, H, W).
        wanted: Per image, the caption's attributes (:func:`~hawkspec.metrics.captions.parse_caption`).
        batch: Images per classifier batch.

    Returns:
        ``alignment_<attribute>`` for every attribute the evaluator predicts (fraction matching), ``alignment`` =
        their mean over :data:`ALIGNMENT_ATTRIBUTES`, and ``alignment_images`` = N.
    """
    pred = evaluator.predict(images, batch)
    out = {f"alignment_{k}": float(np.mean([pred[k][i] == w[k] for i, w in enumerate(wanted)]))
           for k in evaluator.attributes}
    return {"alignment": float(np.mean([out[f"alignment_{k}"] for k in ALIGNMENT_ATTRIBUTES])), **out,
            "alignment_images": len(wanted)}


@dataclass
class QualitySettings:
    """``eval.quality`` (see ``conf/eval.yaml``)."""

    enabled: bool = True
    fid_features: str = "auto"
    inception_weights: str | None = None
    clip_model: str | None = None
    clip_conventions: list = field(default_factory=lambda: list(CLIP_CONVENTIONS))
    clip_prefix: str = LANTERN_PREFIX
    fid_resize: int | str | None = "auto"
    fid_filter: str = "lanczos"
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
        if self.fid_filter not in FID_FILTERS:
            raise ValueError(f"eval.quality.fid_filter={self.fid_filter!r}: choose one of {FID_FILTERS}")
        if not (self.fid_resize in ("auto", None) or (isinstance(self.fid_resize, int) and self.fid_resize >= 16)):
            raise ValueError(f"eval.quality.fid_resize={self.fid_resize!r}: 'auto' (256 with Inception, the decoded "
                             "size with the tiny extractor), null (the decoded size) or a side in px >= 16")
        self.clip_conventions = list(self.clip_conventions)
        bad = [c for c in self.clip_conventions if c not in CLIP_CONVENTIONS]
        if bad or not self.clip_conventions:
            raise ValueError(f"eval.quality.clip_conventions={self.clip_conventions}: choose from {list(CLIP_CONVENTIONS)}")
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
    """torch-fidelity is installed *and* its Inception extractor loads (see :func:`hawkspec.metrics.fid.load_inception_class`)."""
    return inception_available()


# ---------------------------------------------------------------------------------------------- reference images
def reference_files(folder: str | Path, num_images: int = 0) -> list[Path]:
    """The reference images of ``eval.quality.reference.image_dir``: its files with an image suffix
    (:data:`IMAGE_SUFFIXES`), sorted by name, the first ``num_images`` (all when ``num_images <= 0``)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files[:num_images] if num_images > 0 else files


def unreadable_image(path: Path) -> str | None:
    """Why PIL cannot open ``path`` as an image (its header, and for PNG its chunks' checksums); None: it can."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError (bad PNG chunk), struct.error, ...
        return f"{type(e).__name__}: {e}"
    return None


def reference_images(ref: dict, side: int, batch: int, fid_side: int | None = None,
                     fid_filter: str = "lanczos") -> tuple[dict, Iterator[torch.Tensor]]:
    """The real images FID compares with: a description (the cache key) and a generator of uint8 batches.

    ``ref.image_dir`` (a folder of images, sorted by name, the first ``num_images``) when set, else
    ``ref.num_images`` procedural renders of ``ProceduralDataset(num_images, ref.seed, side)``; either way
    center-cropped to the short side and resized to ``fid_side`` (default ``side``) with ``fid_filter``.
    """
    fid_side = fid_side or side
    protocol = fid_protocol(fid_side, fid_filter)
    n = int(ref.get("num_images", 0))
    if ref.get("image_dir"):
        folder = Path(ref["image_dir"])
        files = reference_files(folder, n)
        if len(files) < 2:
            raise ValueError(f"eval.quality.reference.image_dir={folder} holds {len(files)} images; FID needs >= 2")
        desc = {"source": "image_dir", "path": str(folder.resolve()), "num_images": len(files), "side": side,
                "fid_protocol": protocol,
                "files": hashlib.sha1("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode()).hexdigest()}

        def batches():
            from PIL import Image

            def load(p: Path):
                try:
                    return Image.open(p).convert("RGB")
                except Exception as e:  # e.g. a truncated file that passed the start-up check of its header
                    raise ValueError(f"eval.quality.reference.image_dir={folder}: cannot read {p.name} "
                                     f"({type(e).__name__}: {e}); remove or replace it") from e

            for s in range(0, len(files), batch):
                imgs = [np.asarray(center_crop_resize_pil(load(p), fid_side, fid_filter)) for p in files[s : s + batch]]
                yield torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    else:
        seed = int(ref.get("seed", 0))
        desc = {"source": "procedural", "num_images": n, "seed": seed, "side": side, "fid_protocol": protocol}
        ds = ProceduralDataset(n, seed=seed, image_size=side)

        def batches():
            for s in range(0, n, batch):
                imgs = [render(ds.scene(i), side) for i in range(s, min(n, s + batch))]
                yield center_crop_resize(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
                                         fid_side, fid_filter)

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
        resize = settings.fid_resize
        self.fid_side = (FID_SIDE if self.fid_features == "inception" else image_side) if resize == "auto" else \
            (resize or image_side)
        self.fid_filter = settings.fid_filter
        self.fid_protocol = fid_protocol(self.fid_side, self.fid_filter)
        self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False).to(self.device)
        self.reference = self._reference(image_side)
        self.clip = self.clip_score = None
        if settings.clip_model:
            self.clip = load_clip(settings.clip_model)
            self.clip[0].to(self.device)
            if "torchmetrics" in settings.clip_conventions:
                self.clip_score = build_clip_score(settings.clip_model, self.clip).to(self.device)
        self._warned_captions = False

    # -- construction
    def _feature_space(self) -> tuple[str, nn.Module, str]:
        mode = self.settings.fid_features
        weights = inception_weights_path(self.settings.inception_weights)
        usable = None
        if mode == "inception" or (mode == "auto" and weights is not None):
            try:
                load_inception_class()
                usable = True
            except InceptionUnavailable as e:
                usable = e
        if mode == "inception" or (mode == "auto" and usable is True):
            if weights is None:
                raise FileNotFoundError(
                    f"eval.quality.fid_features=inception but no Inception weights: set eval.quality.inception_weights "
                    f"to torch-fidelity's {INCEPTION_FILE}, or place it in {Path(torch.hub.get_dir()) / 'checkpoints'}"
                )
            if usable is not True:
                raise ModuleNotFoundError(
                    f"eval.quality.fid_features=inception needs torch-fidelity's Inception extractor: {usable} "
                    "(pip install -e '.[inception]'), or set eval.quality.fid_features=tiny"
                )
            log.info("FID features: inception (torch-fidelity FeatureExtractorInceptionV3, %s)", weights)
            try:
                module = InceptionFeatures(weights)
            except Exception as e:
                raise ValueError(f"eval.quality.inception_weights={weights}: not torch-fidelity's FID Inception "
                                 f"state dict ({INCEPTION_FILE}): {e}") from e
            return "inception", module, f"inception-{_file_digest(weights)}"
        why = ("eval.quality.fid_features=tiny" if mode == "tiny" else
               "no Inception weights found" if weights is None else f"Inception unavailable: {usable}")
        log.info("FID features: %s, the project's evaluator (%s)", EXTRACTOR_NAME, why)
        return EXTRACTOR_NAME, FeatureModule(self.evaluator), f"{EXTRACTOR_NAME}-{self.evaluator.revision()}"

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Generated uint8 images through the FID protocol (center crop, resize to ``fid_side`` with ``fid_filter``)."""
        return center_crop_resize(images, self.fid_side, self.fid_filter)

    def _reference(self, side: int) -> dict:
        """Load or compute (and cache) the real images' feature statistics into ``self.fid``."""
        desc, batches = reference_images(self.settings.reference, side, self.batch, self.fid_side, self.fid_filter)
        key = hashlib.sha1(json.dumps({"extractor": self.extractor_id, **desc}, sort_keys=True).encode()).hexdigest()
        cache_dir = Path(self.settings.reference.get("cache_dir") or ".")
        path = cache_dir / f"{self.extractor_id}-{self.fid_protocol}-{key[:12]}.pt"
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

    def _fid(self, fid) -> float:
        """:func:`~hawkspec.metrics.fid.frechet_distance` between the real and fake statistics of ``fid``."""
        mu_r, cov_r = stats_from_sums(fid.real_features_sum, fid.real_features_cov_sum, fid.real_features_num_samples)
        mu_f, cov_f = stats_from_sums(fid.fake_features_sum, fid.fake_features_cov_sum, fid.fake_features_num_samples)
        return frechet_distance(mu_r, cov_r, mu_f, cov_f)

    # -- measuring
    @torch.no_grad()
    def measure(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Every metric of the module docstring for uint8 ``images`` (N, 3, H, W) generated from ``prompts``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        self.fid.reset()  # keeps the reference (reset_real_features=False)
        for s in range(0, len(images), self.batch):
            self.fid.update(self._prepare(images[s : s + self.batch]).to(self.device), real=False)
        out = {"fid": self._fid(self.fid), "fid_features": self.fid_features, "fid_protocol": self.fid_protocol}
        spread = _trace_cov(self.fid.fake_features_sum, self.fid.fake_features_cov_sum, self.fid.fake_features_num_samples)
        out["diversity"] = math.sqrt(max(spread, 0.0) / self.reference["trace_cov"])
        out.update(self.alignment(images, prompts))
        out.update(self.clip_scores(images, prompts))
        out["quality_images"] = len(images)
        return out

    @torch.no_grad()
    def clip_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """CLIP score in each configured convention, keyed by convention (``{}`` without a CLIP model)."""
        if self.clip is None:
            return {}
        out = {}
        if self.clip_score is not None:
            self.clip_score.reset()
            for s in range(0, len(images), self.batch):
                self.clip_score.update(images[s : s + self.batch].to(self.device), list(prompts[s : s + self.batch]))
            out[CLIP_CONVENTIONS["torchmetrics"]] = float(self.clip_score.compute())
        if "lantern" in self.settings.clip_conventions:
            cos = torch.cat([clip_cosines(*self.clip, images[s : s + self.batch], prompts[s : s + self.batch],
                                          prefix=self.settings.clip_prefix)
                             for s in range(0, len(images), self.batch)])
            out[CLIP_CONVENTIONS["lantern"]] = float(cos.mean())
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
        return caption_alignment(self.evaluator, images[keep].to(self.device), [wanted[i] for i in keep], self.batch)

    @torch.no_grad()
    def fid_between(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """FID between two generated sets in the same feature space (no reference)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=self.fid.inception, reset_real_features=True).to(self.device)
        for imgs, real in ((a, True), (b, False)):
            for s in range(0, len(imgs), self.batch):
                fid.update(self._prepare(imgs[s : s + self.batch]).to(self.device), real=real)
        return self._fid(fid)

    def describe(self) -> dict:
        """What results.json records about how quality was measured."""
        ev = getattr(self.evaluator, "meta", {})
        clip = None
        if self.clip is not None:
            clip = {"model": self.settings.clip_model, "conventions": {
                c: {"key": CLIP_CONVENTIONS[c], "definition": CLIP_DEFINITIONS[c].format(prefix=self.settings.clip_prefix)}
                for c in self.settings.clip_conventions}}
        return {"fid_features": self.fid_features, "fid_protocol": self.fid_protocol,
                "fid_resize": {"crop": "center, short side", "side": self.fid_side, "filter": self.fid_filter},
                "extractor": self.extractor_id, "reference": self.reference, "clip": clip,
                "evaluator": {"revision": ev.get("revision"), "val_accuracy_vq": ev.get("val_accuracy", {}).get("vq")},
                "clip_model": self.settings.clip_model, "alignment_attributes": list(ALIGNMENT_ATTRIBUTES)}


def noise_floor(ar: dict, ar_reseed: dict) -> dict:
    """``|AR(seed') − AR(seed)|`` for every numeric quality figure the two share."""
    return {k: abs(ar_reseed[k] - ar[k]) for k in ar
            if isinstance(ar.get(k), float) and isinstance(ar_reseed.get(k), float) and k != "quality_images"}


def _describe(desc: dict) -> str:
    if desc["source"] == "procedural":
        return f"{desc['num_images']} procedural images, seed {desc['seed']}, {desc['side']} px, {desc['fid_protocol']}"
    return f"{desc['num_images']} images from {desc['path']}, {desc['fid_protocol']}"


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:12]
