"""What every backbone built on a transformers decoder-only model shares: prefill, tree forward, compaction.

An adapter (``tiny.py``, ``chameleon.py``, ...) says how to encode prompts, where its code rows are and how
to decode images; this class runs the model. Every block goes in as ``inputs_embeds`` from :meth:`embed`, so
an adapter whose image codes have their own embedding (Janus' generation embedding + aligner) overrides one
method. Position ids are always explicit (left padding and rejected tree nodes leave holes in the cache);
tree blocks get an additive 4-D float mask.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from hawkspec.backbones.base import Backbone, CodeHead, KVState, PromptBatch
from hawkspec.backbones.kv_cache import slab_cache


class HFBackbone(Backbone):
    """A :class:`Backbone` over a transformers decoder (``self.transformer``: a ``*Model`` that takes
    ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``cache`` and returns ``last_hidden_state``).

    Subclasses set, besides :class:`Backbone`'s attributes, ``pad_token_id`` and implement
    :meth:`lm_head_weight` (the full LM-head weight, (V, d)), :attr:`transformer`, :meth:`encode` and the
    image side.
    """

    pad_token_id: int

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

    def _run(self, ids, attention_mask, position_ids, cache=None, **kwargs):
        return self.transformer(
            inputs_embeds=self.embed(ids), attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=cache is not None, **kwargs,
        )

    @torch.no_grad()
    def prefill(self, prompts: PromptBatch, cfg: bool, reserve: int = 0) -> tuple[KVState, torch.Tensor]:
        if not len(prompts):
            raise ValueError("prefill needs at least one prompt")
        self.check_prompt_lengths(prompts)
        seqs = [p + list(self.image_start_ids) for p in prompts.streams(cfg)]
        ids, mask = self._left_padded(seqs)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = slab_cache(ids.shape[1] + reserve)  # reserved once: in-place writes, free rewinds
        out = self._run(ids, mask, pos, cache)
        state = KVState(cache=cache, key_mask=mask.bool(), next_pos=mask.sum(1), streams=2 if cfg else 1)
        return state, out.last_hidden_state[:, -1]

    @torch.no_grad()
    def forward(self, state, input_ids, tree_mask=None, depth=None):
        if state.pending:
            raise RuntimeError("the previous tree block was not compacted: call Backbone.compact first")
        N, T = input_ids.shape
        if depth is None:
            depth = torch.arange(T, device=input_ids.device)
        pos = state.next_pos[:, None] + depth  # (N, T)
        new = torch.ones((N, T), dtype=torch.bool, device=input_ids.device)
        if tree_mask is None:
            attn = torch.cat([state.key_mask, new], dim=1).long()  # (N, L+T); transformers adds causality
        else:
            L = state.length
            allowed = torch.cat(
                [state.key_mask[:, None, :].expand(N, T, L), tree_mask.expand(N, T, T)], dim=2
            )  # (N, T, L+T)
            dtype = self.dtype
            attn = torch.zeros((N, 1, T, L + T), dtype=dtype, device=input_ids.device)
            attn.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        out = self._run(input_ids, attn, pos, state.cache)
        state.key_mask = torch.cat([state.key_mask, new], dim=1)
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
        L0 = state.length - T
        A = keep.shape[1]
        idx = None
        for layer in state.cache.layers:  # every layer's keys and values have the same shape: one index
            k, v = layer.keys, layer.values  # (N, heads, L0+T, head_dim)
            if prefix:  # the kept nodes are already in place
                layer.keys, layer.values = k[:, :, : L0 + A], v[:, :, : L0 + A]
                continue
            if idx is None:
                idx = (L0 + keep)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k[:, :, L0 : L0 + A] = k.gather(2, idx)
            v[:, :, L0 : L0 + A] = v.gather(2, idx)
            layer.keys, layer.values = k[:, :, : L0 + A], v[:, :, : L0 + A]
        valid = torch.arange(A, device=keep.device)[None, :] < count[:, None]
        state.key_mask = torch.cat([state.key_mask[:, :L0], valid], dim=1)
        state.next_pos = state.next_pos + count
        state.pending = 0

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
            out = self._run(ids, mask, pos, output_attentions=True)
        finally:
            self.transformer.set_attn_implementation(previous)
        return torch.stack([a[:, :, -Lb:] for a in out.attentions])  # (layers, B, heads, Lb, S)
