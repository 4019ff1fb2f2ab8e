import torch

from hawkspec.backbones.base import CodeHead
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.testing import build_random_backbone


def test_batched_head_stacks_equal_the_resblock_modules():
    bb = build_random_backbone()
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2, num_layers=2), bb)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(5, 7, bb.hidden_size, generator=g)
    reference = torch.stack([blk(x) for blk in heads.blocks], dim=-2)  # one module per head
    torch.testing.assert_close(heads.features(x), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(heads.horizontal(x), heads.code_head(reference[..., :3, :]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(heads.vertical(x), heads.code_head(reference[..., 3:, :]), atol=1e-4, rtol=1e-4)


def test_inference_stack_cache_follows_weight_updates():
    """Decoding caches the stacked head weights; an in-place update (an optimizer step) must invalidate it."""
    import torch

    from hawkspec.heads.draft import DraftHeads, HeadsConfig

    heads = DraftHeads(HeadsConfig(num_horizontal=2, vertical=True, vsd=1), 8, 5, CodeHead(torch.randn(16, 8)))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = heads(x)
        for p in heads.parameters():
            p.add_(0.5)
        after = heads(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, heads(x).detach())  # grad-enabled path (no cache) agrees
