"""What every backbone built on a transformers decoder-only model shares: prefill, tree forward, compaction.

An adapter (``tiny.py``, ``chameleon.py``, ...) says how to encode prompts, where its code rows are and how
to decode images; this class runs the model. Every block goes in as ``inputs_embeds`` from :meth:`embed`, so
an adapter whose image codes have their own embedding (Janus' generation embedding + aligner) overrides one
method. Position ids are always explicit (left padding and rejected tree nodes leave holes in the cache).

Static shapes: the KV cache is transformers' ``StaticCache``, allocated once at prefill with room for the
prompt, the body and the largest tree (``reserve``) and written by position; every block attends to the whole
capacity through an additive 4-D mask built from ``KVState.key_mask`` (slots not written yet are holes). A
forward of T tokens therefore has the same shapes at every step, which is what lets the backbone
compile it once per block size (one tree size, one AR token): :meth:`HFBackbone.compile_steps`.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from hawkspec.backbones.base import Backbone, CodeHead, KVState, PromptBatch
from transformers import StaticCache


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
        first = int(ids[0])
        if self.__dict__.get("_contiguous_codes") is None:
            self.__dict__["_contiguous_codes"] = bool(
                torch.equal(ids.cpu(), torch.arange(first, first + ids.numel())))
        if self._contiguous_codes:
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
    def prefill(self, prompts: PromptBatch, cfg: bool, reserve: int | None = None) -> tuple[KVState, torch.Tensor]:
        if not len(prompts):
            raise ValueError("prefill needs at least one prompt")
        self.check_prompt_lengths(prompts)
        embeds, mask, pos = self.prefill_inputs(prompts, cfg)
        N, P = mask.shape
        if reserve is None:  # a whole image and a tree of up to DEFAULT_TREE_ROOM nodes
            reserve = self.grid.length + self.DEFAULT_TREE_ROOM
        capacity = P + max(int(reserve), 1)
        key_mask = torch.zeros((N, capacity), dtype=torch.bool, device=self.device)
        key_mask[:, :P] = mask.bool()
        allowed = key_mask[:, None, :].expand(N, P, capacity) & torch.ones(
            P, capacity, dtype=torch.bool, device=self.device).tril()  # causal over the prompt's own slots
        cache = StaticCache(config=self.transformer.config, max_cache_len=capacity)  # reserved once
        out = self._run(embeds, self._additive(allowed), pos, cache)
        state = KVState(cache=cache, key_mask=key_mask, next_pos=pos[:, -1] + 1, streams=2 if cfg else 1, used=P)
        return state, out.last_hidden_state[:, -1]

    @torch.no_grad()
    def forward(self, state, input_ids, tree_mask=None, depth=None):
        if state.pending:
            raise RuntimeError("the previous tree block was not compacted: call Backbone.compact first")
        N, T = input_ids.shape
        if state.used + T > state.capacity:
            self._defragment(state)  # rows that accepted less than others left holes: close them
        u, C = state.used, state.capacity
        if u + T > C:
            raise RuntimeError(f"the KV cache holds {C} slots, {u} hold tokens: a block of {T} does not fit "
                               "(prefill(..., reserve=) must cover the body and the largest tree)")
        dev = input_ids.device
        if depth is None:
            depth = torch.arange(T, device=dev)
        pos = state.next_pos[:, None] + depth  # (N, T)
        block = torch.ones(T, T, dtype=torch.bool, device=dev).tril() if tree_mask is None else tree_mask
        allowed = state.key_mask[:, None, :].expand(N, T, C).clone()  # (N, T, C): the committed slots
        allowed[:, :, u : u + T] = block  # the block's own slots: causal, or the tree's ancestors
        out = self._run(self.embed(input_ids), self._additive(allowed), pos, state.cache, compiled=True)
        state.key_mask[:, u : u + T] = True
        state.used = u + T
        if tree_mask is None:
            state.next_pos = state.next_pos + T
        else:
            state.pending = T
        return out.last_hidden_state

    @torch.no_grad()
    def compact(self, state: KVState, keep: torch.Tensor, count: torch.Tensor, prefix: bool = False) -> None:
        T = state.pending
        if not T:
            raise RuntimeError("compact() needs a pending tree block (forward with tree_mask first)")
        L0 = state.used - T
        A = int(count.max()) if count.numel() else 0  # slots every row keeps (rows that keep fewer leave holes)
        keep = keep[:, :A]
        idx = None
        for layer in state.cache.layers:  # every layer's keys and values have the same shape: one index
            if not prefix:  # a chain's accepted nodes are already in place
                k, v = layer.keys, layer.values  # (N, heads, capacity, head_dim)
                if idx is None:
                    idx = (L0 + keep)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                k[:, :, L0 : L0 + A] = k.gather(2, idx)
                v[:, :, L0 : L0 + A] = v.gather(2, idx)
            layer.cumulative_length.fill_(L0 + A)  # the next block is written from here
        state.key_mask[:, L0 : L0 + A] = torch.arange(A, device=keep.device)[None, :] < count[:, None]
        state.key_mask[:, L0 + A :] = False
        state.used = L0 + A
        state.next_pos = state.next_pos + count
        state.pending = 0

    @torch.no_grad()
    def _defragment(self, state: KVState) -> None:
        """Move every row's valid slots to the front of the cache, in order (positions are in the rotary-encoded
        keys, so attention does not change), and free the holes behind them."""
        order = torch.sort((~state.key_mask).to(torch.int8), dim=1, stable=True).indices  # valid slots first
        valid = state.key_mask.sum(1)
        used = int(valid.max())
        order = order[:, :used]
        idx = None
        for layer in state.cache.layers:
            k, v = layer.keys, layer.values  # (N, heads, capacity, head_dim)
            if idx is None:
                idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k[:, :, :used] = k.gather(2, idx)
            v[:, :, :used] = v.gather(2, idx)
            layer.cumulative_length.fill_(used)
        state.key_mask[:] = torch.arange(state.capacity, device=valid.device)[None, :] < valid[:, None]
        state.used = used

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
