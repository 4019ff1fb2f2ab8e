"""What every backbone built on a transformers decoder-only model shares: prefill, tree forward, compaction.

An adapter (``tiny.py``, ``chameleon.py``, ...) says how to encode prompts, where its code rows are and how
to decode images; this class runs the model. Every block goes in as ``inputs_embeds`` from :meth:`embed`, so
an adapter whose image codes have their own embedding (Janus' generation embedding + aligner) overrides one
method. Position ids are always explicit (left padding, and rows that committed different numbers of tokens).

Static shapes: the KV cache is transformers' ``StaticCache`` with its layers writing each row at its own slots
(:class:`RowStaticLayer`), allocated once at prefill with room for the prompt, the body and the largest tree
(``reserve``). Every row keeps its committed tokens contiguous from the prompt on and writes each new block right
after them (``KVState.ptr``), so rows that accept different amounts never leave holes, compaction is a gather
within each row, and no step reads anything back to the host. Every block attends to the whole capacity through
an additive 4-D mask built from ``KVState.key_mask``. A forward of T tokens therefore has the same shapes and
the same code at every step, which is what lets the backbone compile it once per block size
(:meth:`HFBackbone.compile_steps`) and the decoders compile or graph-capture whole steps
(:mod:`hawkspec.decoding.static`).
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from hawkspec.backbones.base import Backbone, CodeHead, KVState, PromptBatch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer


UNWRITTEN = torch.iinfo(torch.long).max
"""``KVState.slot_pos`` of a slot no token was written to: after every position, so no block reads it."""


def capturing() -> bool:
    """True while ``torch.compile`` traces or a CUDA graph records: host-side checks and bookkeeping (anything
    that reads a device value or a changing Python number) are skipped, the caller guarantees them."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Writes:
    """Where the next block goes: (N, T) cache slots, one row per sequence, shared by every layer of a cache."""

    slots: torch.Tensor | None = None


class RowStaticLayer(StaticLayer):
    """A ``StaticLayer`` that writes each row of a block at that row's own slots (``writes.slots``) instead of one
    offset for the whole batch, so sequences that accepted different numbers of tree nodes stay contiguous."""

    def __init__(self, max_cache_len: int, writes: _Writes):
        super().__init__(max_cache_len=max_cache_len)
        self.writes = writes

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.writes.slots  # (N, T)
        N, H, T, _ = key_states.shape
        self.keys.scatter_(2, slots[:, None, :, None].expand(N, H, T, self.k_head_dim), key_states)
        self.values.scatter_(2, slots[:, None, :, None].expand(N, H, T, self.v_head_dim), value_states)
        return self.keys, self.values


def row_static_cache(config, capacity: int) -> StaticCache:
    """transformers' ``StaticCache`` of ``capacity`` slots whose layers are :class:`RowStaticLayer`."""
    cache = StaticCache(config=config, max_cache_len=capacity)
    if any(type(layer) is not StaticLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise TypeError(f"the backbone's cache has layers of kind {kinds}: hawkspec's fixed-capacity KV cache "
                        "supports full-attention layers only (no sliding window)")
    writes = _Writes()
    cache.layers = [RowStaticLayer(capacity, writes) for _ in cache.layers]
    cache.writes = writes
    return cache


class HFBackbone(Backbone):
    """A :class:`Backbone` over a transformers decoder (``self.transformer``: a ``*Model`` that takes
    ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``cache`` and returns ``last_hidden_state``).

    Subclasses set, besides :class:`Backbone`'s attributes, ``pad_token_id`` and implement
    :meth:`lm_head_weight` (the full LM-head weight, (V, d)), :attr:`transformer`, :meth:`encode` and the
    image side.
    """

    pad_token_id: int
    DEFAULT_TREE_ROOM = 64
    """KV slots beyond the body that :meth:`prefill` reserves when the caller does not say (decoders say)."""

    @property
    @abc.abstractmethod
    def transformer(self) -> nn.Module:
        """The decoder without its LM head."""

    @abc.abstractmethod
    def lm_head_weight(self) -> torch.Tensor:
        """(V, d) the LM head weight whose rows ``code_token_ids`` score the image codes."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) input ids -> (N, T, d) input embeddings."""
        return self.transformer.get_input_embeddings()(input_ids)

    @property
    def device(self) -> torch.device:
        return self.code_token_ids.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight().dtype

    # ------------------------------------------------------------------------------------------- code head
    def _code_rows(self) -> torch.Tensor:
        """(K, d) LM-head rows of the codes: a view when the code ids are contiguous, else a gathered copy kept
        until the weight changes or moves."""
        w = self.lm_head_weight()
        ids = self.code_token_ids
        if self.__dict__.get("_code_span") is None:  # read once (a compiled step must not read ids back)
            first = int(ids[0])
            contiguous = bool(torch.equal(ids.cpu(), torch.arange(first, first + ids.numel())))
            self.__dict__["_code_span"] = (first, contiguous)
        first, contiguous = self._code_span
        if contiguous:
            return w[first : first + ids.numel()]
        key = (w.data_ptr(), w.device, w.dtype, w._version)
        cached = self.__dict__.get("_code_rows_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_code_rows_cache"] = (key, w[ids.to(w.device)])
        return cached[1]

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self._code_rows())

    def code_head(self) -> nn.Module:
        return CodeHead(self._code_rows()).requires_grad_(False)

    def code_embeddings(self) -> torch.Tensor:
        return self.embed(self.code_token_ids[None])[0]

    # ------------------------------------------------------------------------------------------- decoding
    def _left_padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (N, L) ids and (N, L) long mask."""
        N, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((N, L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((N, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def prefill_inputs(self, prompts: PromptBatch, cfg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`prefill` runs: (N, P, d) input embeddings of prompt + image-start sequence (left padded),
        (N, P) long key mask and (N, P) position ids, conditional rows then unconditional ones. Adapters whose
        prompt is not token ids (LlamaGen's caption features) override this."""
        seqs = [p + list(self.image_start_ids) for p in prompts.streams(cfg)]
        ids, mask = self._left_padded(seqs)
        return self.embed(ids), mask, (mask.cumsum(1) - 1).clamp(min=0)

    def compile_steps(self, mode: str = "forward") -> "HFBackbone":
        """``"forward"``: run every decoding block (not the prefill) through ``torch.compile`` of the decoder, one
        graph per block size -- static shapes make that one graph for AR and one per tree size. ``"none"``:
        eager. Applies to every decoder on this backbone alike, AR included (compiled vs compiled)."""
        if mode not in ("none", "forward"):
            raise ValueError(f"compile must be none or forward, got {mode!r}")
        if mode == "forward" and self.__dict__.get("_compiled") is not None:  # every decoder's runner asks: once
            return self
        self.__dict__["_compiled"] = torch.compile(self.transformer, dynamic=False) if mode == "forward" else None
        return self

    def _run(self, embeds, attention_mask, position_ids, cache=None, compiled: bool = False, **kwargs):
        model = self.__dict__.get("_compiled") if compiled else None
        return (self.transformer if model is None else model)(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=cache is not None, **kwargs,
        )

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """(N, T, S) bool -> (N, 1, T, S) additive float mask."""
        dtype = self.dtype
        attn = torch.zeros(allowed.shape[:1] + (1,) + allowed.shape[1:], dtype=dtype, device=allowed.device)
        return attn.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    @torch.no_grad()
    def prefill(self, prompts: PromptBatch, cfg: bool, reserve: int | None = None,
                round_to: int = 1, generator: torch.Generator | None = None) -> tuple[KVState, torch.Tensor]:
        if not len(prompts):
            raise ValueError("prefill needs at least one prompt")
        self.check_prompt_lengths(prompts)
        embeds, mask, pos = self.prefill_inputs(prompts, cfg)
        N, P = mask.shape
        if reserve is None:  # a whole image and a tree of up to DEFAULT_TREE_ROOM nodes
            reserve = self.grid.length + self.DEFAULT_TREE_ROOM
        capacity = -(-(P + max(int(reserve), 1)) // round_to) * round_to
        key_mask = torch.zeros((N, capacity), dtype=torch.bool, device=self.device)
        key_mask[:, :P] = mask.bool()
        allowed = key_mask[:, None, :].expand(N, P, capacity) & torch.ones(
            P, capacity, dtype=torch.bool, device=self.device).tril()  # causal over the prompt's own slots
        cache = row_static_cache(self.transformer.config, capacity)  # reserved once
        cache.writes.slots = torch.arange(P, device=self.device).expand(N, P)
        out = self._run(embeds, self._additive(allowed), pos, cache)
        slot_pos = torch.full((N, capacity), UNWRITTEN, dtype=torch.long, device=self.device)
        slot_pos[:, :P] = pos
        state = KVState(cache=cache, key_mask=key_mask, next_pos=pos[:, -1] + 1, streams=2 if cfg else 1, used=P,
                        ptr=torch.full((N,), P, dtype=torch.long, device=self.device), slot_pos=slot_pos)
        return state, out.last_hidden_state[:, -1].contiguous()  # same strides whatever the prompt length

    @torch.no_grad()
    def forward(self, state, input_ids, tree_mask=None, depth=None, positions=None):
        N, T = input_ids.shape
        if not capturing():
            if state.pending:
                raise RuntimeError("the previous tree block was not compacted: call Backbone.compact first")
            self._check_room(state, T)
        dev, C = input_ids.device, state.capacity
        arT = torch.arange(T, device=dev)
        slots = state.ptr[:, None] + arT  # (N, T) each row's block goes right after its committed tokens
        if positions is None:  # the block continues the raster frontier: every committed slot is before it
            pos = state.next_pos[:, None] + (arT if depth is None else depth.to(dev))  # (N, T)
            block = torch.ones(T, T, dtype=torch.bool, device=dev).tril() if tree_mask is None else tree_mask.to(dev)
            allowed = state.key_mask[:, None, :].expand(N, T, C).clone()  # (N, T, C): the committed slots
        else:  # rows in flight: a node sees the committed slots (and, linear, the block's nodes) up to its position
            pos = positions.to(dev).expand(N, T)
            block = (pos[:, None, :] <= pos[:, :, None]) if tree_mask is None else tree_mask.to(dev)
            if tree_mask is None:  # a committed token at a position already held replaces it (ZipAR's stand-in)
                state.key_mask &= ~(state.slot_pos[:, :, None] == pos[:, None, :]).any(-1)
            allowed = state.key_mask[:, None, :] & (state.slot_pos[:, None, :] <= pos[:, :, None])
        allowed.scatter_(2, slots[:, None, :].expand(N, T, T), block.expand(N, T, T))  # the block: causal or the tree
        state.slot_pos.scatter_(1, slots, pos)
        state.cache.writes.slots = slots
        out = self._run(self.embed(input_ids), self._additive(allowed), pos.contiguous(), state.cache, compiled=True)
        if tree_mask is None:  # committed: in place, so a captured step updates the same tensors
            state.key_mask.scatter_(1, slots, True)
            state.ptr.add_(T)
            if positions is None:
                state.next_pos.add_(T)
        if not capturing():
            state.used += T
            state.pending = 0 if tree_mask is None else T
        return out.last_hidden_state

    def _check_room(self, state: KVState, T: int) -> None:
        """A block of T must fit after every row's committed tokens. ``state.used`` bounds the slots any row has
        written without reading the device; only when that bound says the block might not fit is the exact
        pointer read (once, near the end of a run)."""
        if state.used + T <= state.capacity:
            return
        state.used = int(state.ptr.max())
        if state.used + T > state.capacity:
            raise RuntimeError(f"the KV cache holds {state.capacity} slots, a row has {state.used} committed: a "
                               f"block of {T} does not fit (prefill(..., reserve=) must cover the body and the "
                               "largest tree)")

    @torch.no_grad()
    def compact(self, state: KVState, keep: torch.Tensor, count: torch.Tensor, prefix: bool = False) -> None:
        if not capturing():
            if not state.pending:
                raise RuntimeError("compact() needs a pending tree block (forward with tree_mask first)")
            T = state.pending
            if keep.shape[1] > T:
                raise ValueError(f"compact: keep has {keep.shape[1]} columns, the pending block {T} nodes")
            state.used += keep.shape[1] - T  # the bound: a row keeps at most keep.shape[1] of the T it wrote
            state.pending = 0
        keep, count = keep.to(state.ptr.device), count.to(state.ptr.device)
        A = keep.shape[1]  # every row moves A slots (the ones past its count are left unmarked)
        dst = state.ptr[:, None] + torch.arange(A, device=keep.device)  # (N, A)
        if not prefix:  # a chain's accepted nodes are already in place
            src = state.ptr[:, None] + keep
            idx = None
            for layer in state.cache.layers:  # every layer's keys and values have the same shape: one index
                k, v = layer.keys, layer.values  # (N, heads, capacity, head_dim)
                if idx is None:
                    shape = (-1, k.shape[1], -1, k.shape[3])
                    src_idx, idx = src[:, None, :, None].expand(shape), dst[:, None, :, None].expand(shape)
                k.scatter_(2, idx, k.gather(2, src_idx))
                v.scatter_(2, idx, v.gather(2, src_idx))
            state.slot_pos.scatter_(1, dst, state.slot_pos.gather(1, src))
        state.key_mask.scatter_(1, dst, torch.arange(A, device=keep.device)[None, :] < count[:, None])
        state.ptr.add_(count)
        state.next_pos.add_(count)

    @torch.no_grad()
    def attention_maps(self, prompts: PromptBatch, body: torch.Tensor) -> torch.Tensor:
        """(layers, B, heads, L, S) attention of each body token (queries) over every slot of its sequence
        (keys: left padding, prompt, image start, body), conditional stream, eager attention."""
        B, Lb = body.shape
        seqs = [p + list(self.image_start_ids) for p in prompts.cond]
        prompt_ids, mask = self._left_padded(seqs)
        ids = torch.cat([prompt_ids, body.to(self.device)], dim=1)
        mask = torch.cat([mask, torch.ones_like(body, device=self.device)], dim=1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        previous = self.transformer.config._attn_implementation
        self.transformer.set_attn_implementation("eager")
        try:
            out = self._run(self.embed(ids), mask, pos, output_attentions=True)
        finally:
            self.transformer.set_attn_implementation(previous)
        return torch.stack([a[:, :, -Lb:] for a in out.attentions])  # (layers, B, heads, Lb, S)
