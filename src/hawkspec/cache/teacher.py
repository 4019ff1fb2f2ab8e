"""Teacher forcing: the frozen backbone's last-layer hidden states over a whole known image sequence.

The sequence of every row is ``prompt <image_start> body`` (the image-end token is not needed: no head reads the
state after the last end-of-line). Rows are left-padded with position ids counted from the first real token,
exactly like :meth:`hawkspec.backbones.tiny.TinyBackbone.prefill`, so the states equal the ones decoding sees.
"""

from __future__ import annotations

import torch

from hawkspec.backbones.base import Backbone, ImageGrid
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, target_probs


def body_tokens(backbone: Backbone, codes: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) code indices -> (B, rows*W) vocabulary ids, end-of-line tokens inserted."""
    B, rows, cols = codes.shape
    ids = backbone.code_token_ids[codes]  # (B, rows, cols)
    if backbone.grid.eol:
        eol = torch.full((B, rows, 1), backbone.eol_token_id, dtype=ids.dtype, device=ids.device)
        ids = torch.cat([ids, eol], dim=2)  # (B, rows, W)
    return ids.reshape(B, -1)


def body_codes(grid: ImageGrid, codes: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) code indices -> (B, rows*W) long, -1 at forced end-of-line positions."""
    B = codes.shape[0]
    if grid.eol:
        codes = torch.cat([codes, codes.new_full((B, grid.rows, 1), -1)], dim=2)  # (B, rows, W)
    return codes.reshape(B, -1)


@torch.no_grad()
def teacher_forced_hidden(backbone: Backbone, prompt_ids: list[list[int]], body: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states at the image-start token and every body token.

    Args:
        backbone: An HF-based backbone exposing ``model.model`` (the transformer without the LM head).
        prompt_ids: N prompts (token ids ending before the image-start token).
        body: (N, rows*W) body token ids.

    Returns:
        (N, rows*W + 1, d): row ``s + 1`` is the state after reading body position ``s`` (row 0: image start).
    """
    N, Lb = body.shape
    if len(prompt_ids) != N:
        raise ValueError(f"{len(prompt_ids)} prompts for {N} image bodies")
    if not hasattr(backbone, "model") or not hasattr(backbone.model, "model"):
        raise TypeError(f"teacher forcing needs an HF backbone with `model.model`; {type(backbone).__name__} has none")
    device = body.device
    P = max(len(p) for p in prompt_ids)
    T = P + 1 + Lb
    ids = torch.full((N, T), backbone.eol_token_id, dtype=torch.long, device=device)  # pad id is masked anyway
    mask = torch.zeros((N, T), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):  # left padding
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, P - len(p) :] = 1
    ids[:, P] = backbone.image_start_id
    ids[:, P + 1 :] = body
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (N, T)
    out = backbone.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.last_hidden_state[:, P:]  # (N, Lb + 1, d)


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
        hidden (B, rows*W + 1, d) of the conditional stream; topk probabilities and code indices
        (B, rows*W + 1, topk) or None.
    """
    cond = backbone.tokenize(prompts)
    body = body_tokens(backbone, codes)  # (B, Lb)
    streams = 2 if topk and sampling.use_cfg else 1
    prompt_ids = cond + [backbone.uncond_prompt_ids()] * len(cond) * (streams - 1)
    hidden = teacher_forced_hidden(backbone, prompt_ids, body.repeat(streams, 1))  # (streams*B, Lb+1, d)
    if not topk:
        return hidden, None, None
    probs = target_probs(combine_cfg(backbone.code_logits(hidden), streams, sampling.cfg_scale), sampling)
    top = torch.topk(probs, topk, dim=-1)  # (B, Lb+1, topk)
    return hidden[: len(cond)], top.values, top.indices
