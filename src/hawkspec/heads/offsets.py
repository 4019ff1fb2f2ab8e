"""Which token each draft head predicts — defined once, here.

Coordinates are *body positions*: 0 .. rows*W-1 over the image body (end-of-line tokens included), and
``-1`` for the image-start token. The backbone's hidden state at source position ``s`` (the state after
reading the token at ``s``) is what every head reads; the frozen LM head predicts ``s + 1``.

=====================  ====================  =============================================
head                   target position        meaning
=====================  ====================  =============================================
LM head (backbone)     ``s + 1``              the next token
horizontal ``k`` >= 1   ``s + 1 + k``          k tokens after the next one (Medusa's head k)
vertical ``d`` >= 1     ``s + d * W``          d rows below the token at ``s`` (Hawk)
=====================  ====================  =============================================

W counts the end-of-line token (49 for Lumina-mGPT at 768 px). A target is *valid* when it lies inside the
body and is not a forced token; invalid targets are masked out of the loss and never proposed.
"""

from __future__ import annotations

import torch

from hawkspec.backbones.base import ImageGrid


def horizontal_offset(k: int) -> int:
    """Target minus source position of horizontal head ``k`` (1-based)."""
    return 1 + k


def vertical_offset(d: int, tokens_per_row: int) -> int:
    """Target minus source position of vertical head ``d`` (1-based)."""
    return d * tokens_per_row


def head_offsets(num_horizontal: int, vsd: int, tokens_per_row: int) -> list[int]:
    """Offsets of all heads in the order :class:`~hawkspec.heads.draft.DraftHeads` outputs them:
    horizontal 1..n, then vertical 1..vsd."""
    return [horizontal_offset(k) for k in range(1, num_horizontal + 1)] + [
        vertical_offset(d, tokens_per_row) for d in range(1, vsd + 1)
    ]


def head_names(num_horizontal: int, vsd: int) -> list[str]:
    """Stable metric names: ``h1..hn`` then ``v1..vVSD``."""
    return [f"h{k}" for k in range(1, num_horizontal + 1)] + [f"v{d}" for d in range(1, vsd + 1)]


def head_targets(codes: torch.Tensor, grid: ImageGrid, offsets: list[int]) -> torch.Tensor:
    """Training targets of every head at every source position.

    Args:
        codes: (B, rows*W) body code indices, -1 at forced positions.
        grid: The image layout.
        offsets: From :func:`head_offsets`.

    Returns:
        (B, rows*W + 1, H) long: for source ``s = -1 .. rows*W - 1`` (row ``s + 1``) and head ``h``, the code
        at ``s + offsets[h]``, or -100 (ignored) where that target is outside the body or forced.
    """
    codes = codes.long()  # int16 from the cache: the targets must be long for cross-entropy
    B, Lb = codes.shape
    if Lb != grid.length:
        raise ValueError(f"codes have {Lb} body positions, the grid {grid.rows}x{grid.tokens_per_row} has {grid.length}")
    src = torch.arange(-1, Lb, device=codes.device)  # (S,) S = Lb + 1
    tgt = src[:, None] + torch.tensor(offsets, device=codes.device)[None, :]  # (S, H)
    inside = (tgt >= 0) & (tgt < Lb)
    gathered = codes[:, tgt.clamp(0, Lb - 1)]  # (B, S, H)
    valid = inside[None] & (gathered >= 0)
    return torch.where(valid, gathered, torch.full_like(gathered, -100))
