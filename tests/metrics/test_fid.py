"""FID as the papers compute it: the Fréchet distance on cases with a closed form, the center-crop + resize
protocol with its named filter, and torch-fidelity's Inception extractor from a local weights file (randomly
initialised here: nothing is downloaded)."""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hawkspec.metrics import fid as fidmod
from hawkspec.metrics.fid import center_crop_resize, fid_protocol, frechet_distance, stats_from_sums
from hawkspec.metrics.quality import QualityMeter, QualitySettings


# --------------------------------------------------------------------------------------------- Fréchet distance
def test_identical_gaussians_are_at_distance_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_gaussians_match_the_closed_form():
    # N(μ1, diag a) vs N(μ2, diag b): ‖μ1−μ2‖² + Σ (a + b − 2√(ab)) = ‖μ1−μ2‖² + Σ (√a − √b)²
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0  # = 7
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_isotropic_against_a_full_covariance_matches_the_closed_form():
    # Σ1 = s·I, Σ2 with eigenvalues λ: tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) = d·s + Σλ − 2 √s Σ √λ
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    lam = torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0], dtype=torch.float64)
    cov2, s = q @ torch.diag(lam) @ q.T, 2.0
    mu1 = torch.zeros(5, dtype=torch.float64)
    mu2 = torch.tensor([1.0, 0, 0, 0, 2.0], dtype=torch.float64)
    expected = 5.0 + 5 * s + lam.sum() - 2 * np.sqrt(s) * lam.sqrt().sum()
    assert frechet_distance(mu1, s * torch.eye(5, dtype=torch.float64), mu2, cov2) == pytest.approx(float(expected))
    from torchmetrics.image.fid import _compute_fid  # the same number as torchmetrics' definition

    assert float(_compute_fid(mu1, s * torch.eye(5, dtype=torch.float64), mu2, cov2)) == pytest.approx(float(expected))


def test_samples_of_two_gaussians_approach_the_closed_form_through_the_running_sums():
    g = torch.Generator().manual_seed(2)
    n, d = 200_000, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 + torch.tensor([1.0, 0, 0], dtype=torch.float64)
    stats = [stats_from_sums(z.sum(0), z.T @ z, n) for z in (x, y)]
    expected = 1.0 + (1 - 2) ** 2 + 0 + (3 - 2) ** 2  # = 3
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, abs=0.05)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# --------------------------------------------------------------------------------------------- the protocol
def test_center_crop_to_the_short_side_then_resize_with_the_named_filter():
    img = torch.zeros(1, 3, 40, 60, dtype=torch.uint8)
    img[..., :10] = 255  # left and right strips outside the central 40 x 40 square
    img[..., 50:] = 255
    img[:, 0, 10:30, 20:40] = 200  # a red square in the centre
    out = center_crop_resize(img, 256, "lanczos")
    assert out.shape == (1, 3, 256, 256) and out.dtype == torch.uint8
    assert int(out[0, 1].max()) < 30  # the white strips are cropped away (only lanczos ringing is left)
    assert int(out[0, 0, 128, 128]) == 200
    assert not torch.equal(out, center_crop_resize(img, 256, "bicubic"))  # the filter matters, and is named:
    assert fid_protocol(256, "lanczos") == "center-crop-256-lanczos"
    square = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    assert center_crop_resize(square, 256, "lanczos") is square  # already at the protocol size
    with pytest.raises(ValueError, match="fid_filter"):
        center_crop_resize(img, 256, "nearest")


# --------------------------------------------------------------------------------------------- Inception
def _torch_fidelity_dir() -> Path | None:
    """Where torch-fidelity is: installed, or unpacked in $HAWKSPEC_TORCH_FIDELITY_SITE (a pip --target folder).

    Installing torch-fidelity without torchvision breaks ``import torchmetrics`` (it imports torch-fidelity's
    package, which imports torchvision), so on a CPU-only torch it can live in a separate folder for these tests.
    """
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is not None:
        return Path(spec.submodule_search_locations[0]).parent
    site = os.environ.get("HAWKSPEC_TORCH_FIDELITY_SITE")
    return Path(site) if site and (Path(site) / "torch_fidelity").is_dir() else None


@pytest.fixture
def torch_fidelity(monkeypatch):
    site = _torch_fidelity_dir()
    if site is None:
        pytest.skip("torch-fidelity is not installed (pip install -e '.[inception]', or pip install --no-deps "
                    "--target DIR torch-fidelity and set HAWKSPEC_TORCH_FIDELITY_SITE=DIR)")
    import torchmetrics.image.fid  # noqa: F401  (imported before torch_fidelity becomes findable)

    monkeypatch.syspath_prepend(str(site))
    fidmod.load_inception_class.cache_clear()
    yield site
    fidmod.load_inception_class.cache_clear()


@pytest.fixture
def inception_weights(torch_fidelity, tmp_path) -> Path:
    """A random state dict with exactly the keys of torch-fidelity's FID Inception weights, saved to a file."""
    path = tmp_path / "pt_inception-random.pth"
    torch.save(fidmod.random_inception_state_dict(seed=0), path)
    return path


def inception_settings(tmp_path, weights, **kw) -> QualitySettings:
    ref = {"num_images": 3, "seed": 4321, "image_dir": None, "cache_dir": str(tmp_path / "ref"),
           **kw.pop("reference", {})}
    return QualitySettings(**{"fid_features": "inception", "inception_weights": str(weights), "batch_size": 8,
                              "reference": ref, **kw})


def test_inception_features_through_torch_fidelity_with_the_paper_protocol(tmp_path, inception_weights):
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    # the extractor loaded without torch-fidelity's package __init__ leaves no half-imported package behind
    assert "torch_fidelity" not in sys.modules or hasattr(sys.modules["torch_fidelity"], "__version__")
    folder = tmp_path / "coco"
    folder.mkdir()
    from PIL import Image

    g = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 48), (40, 72), (50, 50)]):  # mixed sizes, as in COCO
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
    s = inception_settings(tmp_path, inception_weights, reference={"image_dir": str(folder), "num_images": 0})
    m = QualityMeter(s.validate(3), image_side=48)
    assert m.fid_features == "inception" and m.fid_protocol == "center-crop-256-lanczos"
    assert m.reference["fid_protocol"] == "center-crop-256-lanczos" and m.reference["num_images"] == 3
    assert "center-crop-256-lanczos" in Path(m.reference["cache"]).name
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = m.measure(images, ["a", "b"])
    assert got["fid_features"] == "inception" and got["fid_protocol"] == "center-crop-256-lanczos"
    assert np.isfinite(got["fid"]) and got["fid"] >= -1e-6
    assert m.fid_between(images, images) == pytest.approx(0.0, abs=1e-4)  # round-off of 2048-d eigenvalues only
    d = m.describe()
    assert d["fid_resize"] == {"crop": "center, short side", "side": 256, "filter": "lanczos"}
    # the cache is keyed by protocol: bicubic computes (and caches) its own reference statistics
    b = QualityMeter(inception_settings(tmp_path, inception_weights, fid_filter="bicubic",
                                        reference={"image_dir": str(folder), "num_images": 0}).validate(3), 48)
    assert b.fid_protocol == "center-crop-256-bicubic" and b.reference["cache"] != m.reference["cache"]
    assert len(list((tmp_path / "ref").glob("inception-*.pt"))) == 2


def test_a_wrong_weights_file_names_the_key(tmp_path, torch_fidelity):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match=r"eval\.quality\.inception_weights"):
        QualityMeter(inception_settings(tmp_path, bad).validate(3), 48)


@pytest.fixture
def broken_torch_fidelity(tmp_path, monkeypatch):
    """A torch-fidelity that is installed but cannot load (as without torchvision when its files need it)."""
    pkg = tmp_path / "site" / "torch_fidelity"
    pkg.mkdir(parents=True)
    for name in ("__init__.py", "feature_extractor_inceptionv3.py"):
        (pkg / name).write_text("import torchvision_that_is_not_there\n")
    import torchmetrics.image.fid  # noqa: F401

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fidmod.load_inception_class.cache_clear()
    yield
    fidmod.load_inception_class.cache_clear()


def test_auto_does_not_pick_an_unusable_torch_fidelity(tmp_path, broken_torch_fidelity):
    from hawkspec.metrics.evaluator import EXTRACTOR_NAME

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    s = inception_settings(tmp_path, weights, fid_features="auto", reference={"num_images": 8})
    m = QualityMeter(s.validate(3), 48)
    assert m.fid_features == EXTRACTOR_NAME
    assert "torch_fidelity" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match=r"\.\[inception\]"):
        QualityMeter(inception_settings(tmp_path, weights).validate(3), 48)
