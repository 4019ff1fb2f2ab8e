"""Statistical proof of losslessness on a backbone small enough to enumerate every image.

:func:`image_distribution` computes the exact probability of every possible image under AR's target
distribution (CFG, temperature, top-k — :mod:`hawkspec.decoding.sampling`) by teacher-forcing all of them;
:func:`chi_square` compares a decoder's samples with it.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, target_probs


@torch.no_grad()
def image_distribution(backbone: Backbone, prompt: str, sampling: SamplingConfig, chunk: int = 1024):
    """Exact target probability of every image.

    Returns:
        grids: (M, rows*cols) long, every code grid in raster order (M = K ** (rows*cols)).
        probs: (M,) float64, their probabilities (sum to 1).
    """
    grid, K = backbone.grid, backbone.num_codes
    n = grid.num_codes
    if K**n > 1_000_000:
        raise ValueError(f"{K}^{n} images are too many to enumerate: use a smaller grid or codebook")
    grids = torch.tensor(list(itertools.product(range(K), repeat=n)), dtype=torch.long)
    code_pos = grid.code_positions()
    logp = []
    for part in grids.split(chunk):
        M = part.shape[0]
        body = backbone.body_ids(part.view(M, grid.rows, grid.cols).to(backbone.code_token_ids.device))
        # (streams*M, L, d): row j predicts body position j
        hidden = backbone.teacher_forced(backbone.encode([prompt] * M), body[:, :-1], cfg=sampling.use_cfg)
        streams = hidden.shape[0] // M
        p = target_probs(combine_cfg(backbone.code_logits(hidden), streams, sampling.cfg_scale), sampling)
        p = p[:, code_pos].double().cpu()  # (M, n, K)
        logp.append(p.gather(-1, part.unsqueeze(-1)).squeeze(-1).clamp_min(1e-300).log().sum(-1))
    probs = torch.cat(logp).exp()
    return grids, probs / probs.sum()


def chi_square(samples: torch.Tensor, grids: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test that ``samples`` (S, rows*cols) follow ``probs``.

    Outcomes with expected count below ``min_expected`` are pooled into one bin.
    """
    from scipy.stats import chisquare

    K = int(grids.max()) + 1
    weights = K ** torch.arange(grids.shape[1] - 1, -1, -1)
    index = {int(k): i for i, k in enumerate((grids * weights).sum(1).tolist())}
    sample_keys = (samples.cpu() * weights).sum(1).tolist()
    counts = np.bincount([index[k] for k in sample_keys], minlength=len(index)).astype(float)
    expected = probs.numpy() * len(sample_keys)
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0  # a sample the target cannot produce
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp).pvalue)
