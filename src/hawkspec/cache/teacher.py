"""Teacher forcing: the frozen backbone's last-layer hidden states over a whole known image sequence.

The sequence of every row is ``prompt <image-start sequence> body`` (the image end is not needed: no head
reads the state after the last body token). It runs through :meth:`~hawkspec.backbones.base.Backbone.
teacher_forced` -- the backbone's own prefill and one linear forward, the code path decoding takes -- so the
cached states equal the ones the heads see while decoding, on every backbone.
"""

from __future__ import annotations

import torch

from hawkspec.backbones.base import Backbone, ImageGrid
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, target_probs


def body_codes(grid: ImageGrid, codes: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) code indices -> (B, rows*W) long, -1 at forced end-of-line positions."""
    B = codes.shape[0]
    if grid.eol:
        codes = torch.cat([codes, codes.new_full((B, grid.rows, 1), -1)], dim=2)  # (B, rows, W)
    return codes.reshape(B, -1)


@torch.no_grad()
def teacher_forced_states(
    backbone: Backbone, prompts: list[str], codes: torch.Tensor, sampling: SamplingConfig, topk: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Conditional hidden states and, when ``topk > 0``, the top-k of the target next-code distribution.

    Args:
        backbone: The frozen model.
        prompts: B captions.
        codes: (B, rows, cols) the image codes.
        sampling: Defines the target (:func:`~hawkspec.decoding.sampling.target_probs`: CFG, top-k, temperature).
        topk: How many of the most likely next codes to keep per position (0: none).

    Returns:
        hidden (B, rows*W + 1, d) of the conditional stream (row ``s + 1``: after body position ``s``; row 0:
        after the image-start sequence); topk probabilities and code indices (B, rows*W + 1, topk) or None.
    """
    B = len(prompts)
    cfg = bool(topk) and sampling.use_cfg
    hidden = backbone.teacher_forced(backbone.encode(prompts), backbone.body_ids(codes), cfg=cfg)  # (S*B, Lb+1, d)
    if not topk:
        return hidden, None, None
    probs = target_probs(combine_cfg(backbone.code_logits(hidden), hidden.shape[0] // B, sampling.cfg_scale), sampling)
    top = torch.topk(probs, topk, dim=-1)  # (B, Lb+1, topk)
    return hidden[:B], top.values, top.indices
