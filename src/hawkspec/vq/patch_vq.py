"""A VQ image tokenizer whose codebook is learned by k-means over raw pixel patches.

Each non-overlapping ``patch_size x patch_size`` patch of an image becomes one token: the
index of the nearest (L2) codebook vector. Decoding pastes the codebook vectors back.
This is a cheap stand-in for a learned VQ-VAE that is good enough for small procedural
images.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

CHUNK = 32_768  # patches per distance computation: CHUNK x num_codes floats in memory
KMEANS_PP_SAMPLES = 20_000  # k-means++ initialisation runs on at most this many patches


def _as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float input is assumed to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class PatchVQ(torch.nn.Module):
    """Patch tokenizer with a k-means codebook.

    The codebook starts out uniformly random (deterministic) until :meth:`fit` or
    :meth:`load` replaces it.

    Args:
        num_codes: Codebook size (the image-token vocabulary size).
        patch_size: Side of the square patches; image sides must be divisible by it.
        channels: Number of image channels.
    """

    codebook: torch.Tensor

    def __init__(self, num_codes: int = 512, patch_size: int = 4, channels: int = 3) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.patch_size = patch_size
        self.channels = channels
        generator = torch.Generator().manual_seed(0)
        # (num_codes, patch_dim) patch pixel vectors in [0, 1], channel-major: (C, p, p) flattened.
        self.register_buffer("codebook", torch.rand(num_codes, self.patch_dim, generator=generator))

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector, ``channels * patch_size**2``."""
        return self.channels * self.patch_size**2

    @property
    def codebook_vectors(self) -> torch.Tensor:
        """The (num_codes, patch_dim) float32 codebook, pixel values in [0, 1]."""
        return self.codebook

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, patch_size={self.patch_size}, channels={self.channels}"

    # ------------------------------------------------------------------ patches

    def _patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p, W/p, C*p*p) float in [0, 1], on the codebook's device."""
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images of shape (B, {self.channels}, H, W), got {tuple(images.shape)}")
        b, c, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
        x = _as_float(images.to(self.codebook.device))
        x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p, w, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C*p*p) -> (B, C, h*p, w*p)."""
        b, h, w, _ = patches.shape
        p, c = self.patch_size, self.channels
        x = patches.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
        return x.reshape(b, c, h * p, w * p)

    def _nearest(self, flat: torch.Tensor, codebook: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code for each row of ``flat`` (N, D), in chunks.

        Returns:
            ``(codes, sq_err)``: LongTensor (N,) and float (N,) squared L2 distance summed over D.
        """
        codebook = self.codebook if codebook is None else codebook
        code_sq = (codebook * codebook).sum(1)  # (K,)
        codes = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        sq_err = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
        for start in range(0, flat.shape[0], CHUNK):
            x = flat[start : start + CHUNK]  # (n, D)
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
            dist = torch.addmm(code_sq, x, codebook.T, alpha=-2.0)  # (n, K)
            best, idx = dist.min(1)
            codes[start : start + CHUNK] = idx
            sq_err[start : start + CHUNK] = (best + (x * x).sum(1)).clamp_min(0)
        return codes, sq_err

    # ------------------------------------------------------------------ encode / decode

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Tokenizes images.

        Args:
            images: (B, C, H, W) uint8 in [0, 255] or float in [0, 1].

        Returns:
            LongTensor (B, H/p, W/p) of code indices.

        Raises:
            ValueError: If H or W is not divisible by ``patch_size`` or the shape is wrong.
        """
        patches = self._patchify(images)  # (B, h, w, D)
        codes, _ = self._nearest(patches.reshape(-1, self.patch_dim))
        return codes.reshape(patches.shape[:3])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Turns codes back into pixels.

        Args:
            codes: Integer tensor (B, h, w) of code indices.

        Returns:
            uint8 tensor (B, C, h*p, w*p).
        """
        patches = self.codebook[codes.to(self.codebook.device).long()]  # (B, h, w, D)
        images = self._unpatchify(patches)  # (B, C, H, W) float in [0, 1]
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)

    # ------------------------------------------------------------------ fitting

    @torch.no_grad()
    def fit(self, images: torch.Tensor, iters: int = 20, seed: int = 0, progress: bool = True) -> dict[str, float | int]:
        """Learns the codebook with k-means on all patches of ``images``.

        Initialisation is k-means++ on a random subsample of at most ``KMEANS_PP_SAMPLES``
        patches, followed by ``iters`` Lloyd iterations over all patches. Clusters that end
        up empty are re-seeded with the currently worst-reconstructed patches.

        Args:
            images: (N, C, H, W) uint8 images (float in [0, 1] also accepted).
            iters: Number of Lloyd iterations.
            seed: Seed for the subsample and the k-means++ draws; same seed, same codebook.
            progress: Show a tqdm progress bar.

        Returns:
            ``{"mse": mean squared error per pixel value in [0, 1] units, "used_codes": int}``
            of the final codebook on ``images``.
        """
        flat = self._patchify(images).reshape(-1, self.patch_dim).contiguous()  # (P, D)
        generator = torch.Generator().manual_seed(seed)
        codebook = self._kmeans_pp_init(flat, generator)  # (K, D)

        bar = tqdm(range(iters), desc="k-means", disable=not progress, leave=False)
        for _ in bar:
            codes, sq_err = self._nearest(flat, codebook)
            bar.set_postfix(mse=f"{sq_err.mean().item() / self.patch_dim:.5f}")
            counts = torch.bincount(codes, minlength=self.num_codes)  # (K,)
            sums = torch.zeros_like(codebook).index_add_(0, codes, flat)  # (K, D)
            alive = counts > 0
            codebook[alive] = sums[alive] / counts[alive, None].to(flat.dtype)
            dead = (~alive).nonzero().squeeze(1)
            if len(dead):
                dead = dead[: flat.shape[0]]
                worst = sq_err.topk(len(dead)).indices  # worst-reconstructed patches
                codebook[dead] = flat[worst]
        bar.close()

        codes, sq_err = self._nearest(flat, codebook)
        self.codebook.copy_(codebook)
        return {
            "mse": sq_err.mean().item() / self.patch_dim,
            "used_codes": int(torch.unique(codes).numel()),
        }

    def _kmeans_pp_init(self, flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """k-means++ seeding on a subsample of ``flat`` (P, D); returns (K, D) centres."""
        num = min(flat.shape[0], KMEANS_PP_SAMPLES)
        sample = flat[torch.randperm(flat.shape[0], generator=generator)[:num].to(flat.device)]  # (S, D)
        centres = torch.empty(self.num_codes, self.patch_dim, dtype=flat.dtype, device=flat.device)
        first = int(torch.randint(num, (1,), generator=generator))
        centres[0] = sample[first]
        sample_sq = (sample * sample).sum(1)  # (S,)

        def sq_dist(centre: torch.Tensor) -> torch.Tensor:  # (D,) -> (S,)
            return (sample_sq - 2 * (sample @ centre) + centre @ centre).clamp_min(0)

        min_sq = sq_dist(centres[0])  # (S,) squared distance to the nearest chosen centre
        for k in range(1, self.num_codes):
            weights = min_sq.cpu().double()
            if weights.sum() <= 0:  # fewer distinct patches than codes: pick uniformly
                weights = torch.ones_like(weights)
            pick = int(torch.multinomial(weights, 1, generator=generator))
            centres[k] = sample[pick]
            torch.minimum(min_sq, sq_dist(centres[k]), out=min_sq)
        return centres

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Writes the codebook to a safetensors file (with num_codes/patch_size/channels metadata)."""
        metadata = {
            "num_codes": str(self.num_codes),
            "patch_size": str(self.patch_size),
            "channels": str(self.channels),
        }
        save_file({"codebook": self.codebook.detach().cpu().contiguous()}, str(path), metadata=metadata)

    def load(self, path: str | os.PathLike) -> PatchVQ:
        """Loads a codebook saved by :meth:`save` into this module (configs must match).

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file's codebook shape differs from this module's.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"PatchVQ codebook file not found: {path}")
        codebook = load_file(str(path))["codebook"]
        if tuple(codebook.shape) != tuple(self.codebook.shape):
            raise ValueError(
                f"codebook in {path} has shape {tuple(codebook.shape)}, "
                f"expected {tuple(self.codebook.shape)} for {self.extra_repr()}"
            )
        self.codebook.copy_(codebook)
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PatchVQ:
        """Builds a :class:`PatchVQ` from a file written by :meth:`save`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"PatchVQ codebook file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        vq = cls(
            num_codes=int(meta["num_codes"]),
            patch_size=int(meta["patch_size"]),
            channels=int(meta["channels"]),
        )
        return vq.load(path)
