"""FID as the papers compute it: the image protocol, Inception features through torch-fidelity, the Fréchet distance.

* **Protocol** (``fid_protocol``, e.g. ``center-crop-256-lanczos``): every image, generated or real, is
  center-cropped to its short side and resized to ``side`` px with a named PIL filter before feature extraction
  (LANTERN's ``eval_fid_clip.py``: crop to the short side, 256 px, LANCZOS, then clean-fid's Inception).
  Square images already at ``side`` px pass unchanged.
* **Inception**: torch-fidelity's ``FeatureExtractorInceptionV3`` (the 2048-d pool features of the TF FID
  Inception, which resizes to 299 px with TF1's bilinear itself) from a local weights file; never downloaded.
  torch-fidelity's package ``__init__`` imports torchvision, which may not be installable beside this torch; the
  extractor's own module needs only torch, so when the package import fails it is loaded from its files without
  running the package ``__init__`` (:func:`load_inception_class`).
* **Fréchet distance** ``‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)``, in float64 (:func:`frechet_distance`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import lru_cache

import numpy as np
import torch
from torch import nn

FID_FILTERS = ("lanczos", "bicubic")
FID_SIDE = 256  # the papers' protocol


def fid_protocol(side: int, filt: str) -> str:
    """The protocol's name, as results carry it."""
    return f"center-crop-{side}-{filt}"


def _pil_filter(name: str):
    from PIL import Image

    if name not in FID_FILTERS:
        raise ValueError(f"eval.quality.fid_filter={name!r}: choose one of {FID_FILTERS}")
    return {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}[name]


def center_crop_resize_pil(img, side: int, filt: str):
    """A PIL image center-cropped to its short side and resized to ``side`` × ``side`` with filter ``filt``."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if (w, h) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    if s != side:
        img = img.resize((side, side), _pil_filter(filt))
    return img


def center_crop_resize(images: torch.Tensor, side: int, filt: str) -> torch.Tensor:
    """uint8 ``images`` (N, 3, H, W) through :func:`center_crop_resize_pil`; unchanged when already ``side`` square."""
    _pil_filter(filt)
    if images.shape[-2:] == (side, side):
        return images
    from PIL import Image

    out = [np.asarray(center_crop_resize_pil(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()), side, filt))
           for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous().to(images.device)


# ---------------------------------------------------------------------------------------------- Fréchet distance
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½`` in float64.

    ``tr (Σ₁Σ₂)^½`` is the sum of the square roots of the eigenvalues of Σ₁Σ₂ (real and non-negative for two PSD
    matrices; tiny negative or imaginary parts from round-off are dropped), as torchmetrics computes it.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: mismatched shapes {tuple(mu1.shape)}, {tuple(s1.shape)}, "
                         f"{tuple(mu2.shape)}, {tuple(s2.shape)}")
    eig = torch.linalg.eigvals(s1 @ s2)
    root_trace = eig.real.clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * root_trace)


def stats_from_sums(total: torch.Tensor, cov_sum: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance from torchmetrics FID's running sums (Σx, Σxxᵀ, n)."""
    n = float(n)
    mean = total.double() / n
    cov = (cov_sum.double() - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


# ---------------------------------------------------------------------------------------------- Inception
class InceptionUnavailable(ImportError):
    """torch-fidelity's Inception extractor cannot be loaded here."""


@lru_cache(maxsize=1)
def load_inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` class.

    The normal import when the package imports (torchvision present); else its module and the three modules it
    needs (helpers, defaults/deprecations, feature_extractor_base, interpolate_compat_tensorflow) are executed from
    the installed files under a bare ``torch_fidelity`` package object that is removed from ``sys.modules`` again,
    so a later ``import torch_fidelity`` still runs the real package. Raises :class:`InceptionUnavailable`.
    """
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailable("torch-fidelity is not installed: pip install -e '.[inception]'")
    ours = lambda k: k == "torch_fidelity" or k.startswith("torch_fidelity.")  # noqa: E731
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    except Exception as first:  # noqa: BLE001 - typically ModuleNotFoundError: torchvision
        package_error = first
    for k in [k for k in sys.modules if ours(k)]:  # what the failed package import left half-done
        del sys.modules[k]
    bare = types.ModuleType("torch_fidelity")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = None
    sys.modules["torch_fidelity"] = bare
    try:
        cls = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    except Exception as e:  # noqa: BLE001
        raise InceptionUnavailable(
            f"torch-fidelity is installed but its Inception extractor cannot be loaded ({package_error!r}; "
            f"from its files: {e!r})") from e
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return cls


def inception_available() -> bool:
    try:
        load_inception_class()
        return True
    except InceptionUnavailable:
        return False


class InceptionFeatures(nn.Module):
    """The 2048-d FID features of torch-fidelity's Inception, from weights file ``weights`` (uint8 in, float out).

    ``num_features`` lets torchmetrics' ``FrechetInceptionDistance`` take it as a custom extractor.
    """

    num_features = 2048

    def __init__(self, weights) -> None:
        super().__init__()
        cls = load_inception_class()
        self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # always in eval mode (batch norm statistics are the weights')

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0].reshape(len(x), -1)


def random_inception_state_dict(seed: int = 0) -> dict:
    """A randomly initialised state dict with the keys and shapes of the FID Inception weights (tests: no download).

    Builds torch-fidelity's extractor with its weight loading skipped (a subclass whose ``load_state_dict`` is a
    no-op, given a weights file holding ``{}``), so the keys are exactly those the real file must have.
    """
    import tempfile
    from pathlib import Path

    cls = load_inception_class()

    class _Unloaded(cls):
        def load_state_dict(self, *args, **kwargs):
            return None

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    # He-normal convolutions keep the activations' scale through the ~95 layers (PyTorch's default init shrinks them
    # into denormals, which makes CPU inference ~50x slower)
    for mod in net.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return {k: v.clone() for k, v in net.state_dict().items()}
