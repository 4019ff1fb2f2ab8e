"""CFG is mixed in float32 for every backbone and decoder (issue: decide exactly as the official code).

The official Lumina-mGPT / SJD / GSD code casts the logits to float32 before mixing the conditional and
unconditional streams; mixing in the model's bf16 moves the target. Every decoder's target (and AR's) comes from
``target_probs(combine_cfg(code_logits))``, so one check of that composition on a bf16 model covers them all.
"""

import torch

from hawkspec.backbones.chameleon import ChameleonBackbone
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, target_probs


def test_bf16_chameleon_target_equals_the_float32_mix():
    bb = ChameleonBackbone.random(rows=4, cols=4, num_codes=64, seed=0, with_vqgan=False)
    bb.model.to(torch.bfloat16)
    state, h = bb.prefill(bb.encode(["a large red circle", "a small blue square"]), cfg=True)
    logits = bb.code_logits(h)  # (2B, K) in the model's dtype, as every decoder computes them
    assert logits.dtype == torch.bfloat16
    s = SamplingConfig(temperature=1.0, top_k=48, cfg_scale=3.0)
    ours = target_probs(combine_cfg(logits, 2, s.cfg_scale), s)

    # the official reference: cast each stream to float32, then uncond + s * (cond - uncond), top-k, softmax
    cond, uncond = logits.float().chunk(2)
    mixed = uncond + 3.0 * (cond - uncond)
    kth = torch.topk(mixed, 48).values[..., -1:]
    reference = torch.softmax(mixed.masked_fill(mixed < kth, float("-inf")), -1)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference)

    # negative control: mixing in bf16 (what hawkspec did before) gives another target
    c16, u16 = logits.chunk(2)
    in_bf16 = target_probs(u16 + 3.0 * (c16 - u16), s)
    tv = 0.5 * (in_bf16 - reference).abs().sum(-1)
    assert (tv > 1e-4).all(), tv


def test_combine_cfg_returns_float32_without_guidance_too():
    x = torch.randn(3, 8).to(torch.bfloat16)
    assert combine_cfg(x, 1, 3.0).dtype == torch.float32
    assert torch.equal(combine_cfg(x, 1, 3.0), x.float())
