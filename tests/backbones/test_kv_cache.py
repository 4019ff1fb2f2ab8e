"""The slab KV cache gives the backbone exactly what transformers' concatenating DynamicCache gives it."""

import pytest
import torch
from transformers import DynamicCache

import hawkspec.backbones.hf as hf_module
from hawkspec.backbones.kv_cache import SlabLayer, slab_cache


def _decode(bb, prompts, steps: int, seed: int):
    """Prefill, then a mix of linear blocks and trees with gathering and prefix compactions."""
    gen = torch.Generator().manual_seed(seed)
    state, h = bb.prefill(bb.encode(prompts), cfg=True)
    N = state.key_mask.shape[0]
    outs = [h]
    for step in range(steps):
        T = 1 + step % 4
        ids = torch.randint(0, bb.num_codes, (N, T), generator=gen) + bb.layout.code_offset
        if step % 3 == 0:
            outs.append(bb.forward(state, ids))
            continue
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        if step % 3 == 1 and T > 2:  # a tree: node 2 is a sibling of node 1
            mask[2, 1] = False
        depth = mask.sum(-1) - 1
        outs.append(bb.forward(state, ids, tree_mask=mask, depth=depth))
        count = torch.randint(1, T + 1, (N,), generator=gen)
        if step % 3 == 1 and T > 2:
            keep = torch.tensor([0, 2] + list(range(3, T))).expand(N, -1)
            count = count.clamp(max=T - 1)
        else:
            keep = torch.arange(T).expand(N, -1)
        bb.compact(state, keep.contiguous(), count, prefix=step % 3 == 2)
    return torch.cat([o.reshape(-1) for o in outs]), state


@pytest.mark.parametrize("capacity", [4, 256])  # 4: the slab grows several times
def test_slab_cache_equals_dynamic_cache(random_backbone, prompts, monkeypatch, capacity):
    monkeypatch.setattr(SlabLayer, "min_capacity", capacity)
    ours, s1 = _decode(random_backbone, prompts, steps=12, seed=3)
    monkeypatch.setattr(hf_module, "slab_cache", lambda capacity=0: DynamicCache())
    ref, s2 = _decode(random_backbone, prompts, steps=12, seed=3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(s1.key_mask, s2.key_mask) and torch.equal(s1.next_pos, s2.next_pos)
    assert all(isinstance(layer, SlabLayer) for layer in s1.cache.layers)


def test_slab_layer_writes_in_place_and_recovers_from_a_foreign_tensor():
    cache = slab_cache()
    k = torch.randn(2, 3, 5, 4)
    keys, _ = cache.update(k, k + 1, 0)
    layer = cache.layers[0]
    buf = layer._k
    keys, values = cache.update(k[:, :, :2], k[:, :, :2] + 1, 0)
    assert layer._k is buf and keys.data_ptr() == buf.data_ptr()  # no reallocation, no copy of the old slots
    torch.testing.assert_close(keys, torch.cat([k, k[:, :, :2]], dim=2))
    layer.keys, layer.values = layer.keys[:, :, :3], layer.values[:, :, :3]  # a rewind: a narrower view
    keys, values = cache.update(k[:, :, :1] * 7, k[:, :, :1] * 7, 0)
    torch.testing.assert_close(keys, torch.cat([k[:, :, :3], k[:, :, :1] * 7], dim=2))
    layer.keys = -layer.keys  # someone replaced the tensor: it must be copied, not ignored
    layer.values = -layer.values
    keys, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    torch.testing.assert_close(keys, torch.cat([-k[:, :, :3], -k[:, :, :1] * 7, k[:, :, :1]], dim=2))
    assert cache.get_seq_length() == 5
