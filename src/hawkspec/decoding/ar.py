"""Plain autoregressive sampling with a KV cache: the baseline every speedup is measured against.

It is kept as lean as transformers' own ``generate`` (one forward of one token per step, code logits only),
and ``make bench`` checks that it is not slower.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, entropy, sample, target_probs


@torch.no_grad()
def ar_generate(
    backbone: Backbone,
    prompts: list[str],
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    progress: bool = False,
    track_entropy: bool = False,
) -> GenerationOutput:
    """Sample one image per prompt, one token per forward pass.

    Args:
        backbone: The frozen model.
        prompts: B captions.
        sampling: CFG scale, temperature, top-k.
        generator: Seeds the draws (same generator state -> same images).
        progress: Show a progress bar over image tokens.
        track_entropy: Also return the mean target entropy over sampled positions.
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    sampling.validate(backbone.num_codes)
    grid = backbone.grid
    B = len(prompts)
    state, hidden = backbone.prefill(backbone.encode(prompts), cfg=sampling.use_cfg, reserve=grid.length)
    streams = state.streams
    device = hidden.device
    forced = grid.forced_mask().tolist()
    tokens = torch.empty((B, grid.length), dtype=torch.long, device=device)
    codes = torch.empty((B, grid.num_codes), dtype=torch.long, device=device)
    eol = torch.full((B,), backbone.eol_token_id if grid.eol else 0, dtype=torch.long, device=device)
    forwards, n_code, ent_sum = 1, 0, 0.0
    for j in tqdm(range(grid.length), disable=not progress, desc="AR", leave=False):
        if forced[j]:
            tok = eol
        else:
            probs = target_probs(combine_cfg(backbone.code_logits(hidden), streams, sampling.cfg_scale), sampling)
            if track_entropy:
                ent_sum += entropy(probs).mean().item()
            code = probs.argmax(-1) if sampling.greedy else sample(probs, generator)
            codes[:, n_code] = code
            n_code += 1
            tok = backbone.code_token_ids[code]
        tokens[:, j] = tok
        if j < grid.length - 1:
            hidden = backbone.forward(state, tok.repeat(streams)[:, None])[:, -1]
            forwards += 1
    return GenerationOutput(
        codes=codes.view(B, grid.rows, grid.cols),
        tokens=tokens,
        forwards=forwards,
        forwards_per_image=torch.full((B,), forwards),
        mean_entropy=ent_sum / n_code if track_entropy else None,
    )
