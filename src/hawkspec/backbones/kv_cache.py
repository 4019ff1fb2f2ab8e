"""A KV cache whose layers write into preallocated slabs instead of concatenating.

transformers' ``DynamicLayer`` appends a block with ``torch.cat``: every forward copies the whole cache of
every layer. Speculative decoding also rewinds the cache after each tree (:meth:`Backbone.compact` keeps
the accepted nodes), so a ``DynamicLayer`` pays that copy on every step, from a sliced, non-contiguous view.
A :class:`SlabLayer` keeps one buffer per layer with room to spare (doubling when full): a forward writes
its block in place and the layer's ``keys``/``values`` are views of the buffer's first ``length`` slots,
so a rewind is a narrower view and nothing is copied. Same values, same attention, same order of
operations as ``DynamicLayer`` (the views are what ``cat`` would have built).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of a preallocated buffer.

    Code that rewinds the cache assigns a narrower view (``layer.keys = layer.keys[:, :, :n]``) or writes
    into the current view; anything else assigned to ``keys`` is copied into a fresh buffer on the next
    update, so the layer never returns stale data. The buffer holds ``capacity`` slots from the first update
    (a backbone reserves prompt + body + the largest tree once); it only grows (doubling) if a caller writes
    past what it reserved.
    """

    min_capacity = 256
    capacity = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def _length(self) -> int:
        return self.keys.shape[-2] if self.keys.dim() == 4 else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self._length()
        m = n + key_states.shape[-2]
        in_buffer = self._k is not None and (n == 0 or self.keys.data_ptr() == self._k.data_ptr())
        if not in_buffer or m > self._k.shape[-2] or key_states.shape[0] != self._k.shape[0]:
            N, H, _, Dk = key_states.shape
            first = self._k is None and self.capacity >= m  # the reserved size, allocated once
            cap = self.capacity if first else max(2 * m, self.min_capacity)
            k = key_states.new_empty((N, H, cap, Dk))
            v = value_states.new_empty((N, H, cap, value_states.shape[-1]))
            if n:
                k[:, :, :n] = self.keys
                v[:, :, :n] = self.values
            self._k, self._v = k, v
        self._k[:, :, n:m] = key_states
        self._v[:, :, n:m] = value_states
        self.keys, self.values = self._k[:, :, :m], self._v[:, :, :m]
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def slab_cache(capacity: int = 0) -> Cache:
    """An empty cache of :class:`SlabLayer` s (one per attention layer, created on first use) whose buffers
    hold ``capacity`` slots from the start."""
    if capacity <= 0:
        return Cache(layer_class_to_replicate=SlabLayer)
    layer = type("SlabLayer", (SlabLayer,), {"capacity": int(capacity), "__doc__": SlabLayer.__doc__})
    return Cache(layer_class_to_replicate=layer)
