"""Tests for the k-means patch tokenizer."""

import pytest
import torch

from hawkspec.data.procedural import ProceduralDataset
from hawkspec.vq.patch_vq import PatchVQ


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    ds = ProceduralDataset(200, seed=0, image_size=24)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])  # (200, 3, 24, 24)


@pytest.fixture(scope="module")
def fitted(images) -> tuple[PatchVQ, dict]:
    vq = PatchVQ(num_codes=64, patch_size=4)
    stats = vq.fit(images, iters=5, seed=0, progress=False)
    return vq, stats


def _mse(vq: PatchVQ, images: torch.Tensor) -> float:
    recon = vq.decode(vq.encode(images))
    return ((recon.float() - images.float()) / 255).pow(2).mean().item()


def test_fit_stats_and_round_trip_shapes(fitted, images):
    vq, stats = fitted
    assert 0 < stats["mse"] < 0.02 and 1 <= stats["used_codes"] <= 64
    codes = vq.encode(images[:4])
    assert codes.dtype == torch.long and codes.shape == (4, 6, 6)
    assert 0 <= codes.min() and codes.max() < 64
    recon = vq.decode(codes)
    assert recon.dtype == torch.uint8 and recon.shape == (4, 3, 24, 24)
    assert vq.codebook_vectors.shape == (64, 48) and vq.codebook_vectors.dtype == torch.float32
    # Float input in [0, 1] encodes the same as uint8 input.
    assert torch.equal(vq.encode(images[:4].float() / 255), codes)
    # The reported mse matches an independent reconstruction (up to uint8 rounding).
    assert _mse(vq, images) == pytest.approx(stats["mse"], rel=0.05, abs=1e-4)


def test_fit_beats_random_codebook_and_is_deterministic(fitted, images):
    vq, _ = fitted
    assert _mse(vq, images) < 0.5 * _mse(PatchVQ(num_codes=64, patch_size=4), images)
    again = PatchVQ(num_codes=64, patch_size=4)
    again.fit(images, iters=5, seed=0, progress=False)
    assert torch.equal(again.codebook, vq.codebook)


def test_save_load_round_trip(fitted, images, tmp_path):
    vq, _ = fitted
    path = tmp_path / "vq.safetensors"
    vq.save(path)
    loaded = PatchVQ.from_file(path)
    assert (loaded.num_codes, loaded.patch_size, loaded.channels) == (64, 4, 3)
    assert torch.equal(loaded.encode(images[:8]), vq.encode(images[:8]))
    other = PatchVQ(num_codes=64, patch_size=4).load(path)
    assert torch.equal(other.codebook, vq.codebook)
    with pytest.raises(ValueError, match="shape"):
        PatchVQ(num_codes=32, patch_size=4).load(path)


def test_errors():
    vq = PatchVQ(num_codes=8, patch_size=4)
    with pytest.raises(ValueError, match="30x32"):
        vq.encode(torch.zeros(1, 3, 30, 32, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        PatchVQ.from_file("/nonexistent/nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        vq.load("/nonexistent/nope.safetensors")


def test_fit_with_fewer_distinct_patches_than_codes():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)  # one distinct patch
    stats = PatchVQ(num_codes=16, patch_size=4).fit(images, iters=2, progress=False)
    assert stats["mse"] == pytest.approx(0.0) and stats["used_codes"] == 1
