"""The backbone interface: the one abstraction every decoder, the cache writer and the heads talk to.

A backbone is a frozen autoregressive text-to-image model that writes an image as a raster of discrete
VQ codes laid out like Lumina-mGPT::

    [prompt tokens] [image-start sequence] (row of `cols` codes, [end-of-line]) x rows [image end]

The image-start sequence may be several tokens (Lumina-mGPT: image start and two size tokens) or none
(LlamaGen); the end-of-line token and the image end are optional.

Two things make speculative decoding possible on top of it, and both live here:

* :class:`PromptBatch` — prompts encoded by the backbone, conditional and unconditional streams per prompt.
* :class:`KVState` — a KV cache plus a per-slot validity mask, each sequence's next free slot and next
  position id, so that a batch of sequences can accept different numbers of tokens per step without forcing
  the batch to one length.
* :meth:`Backbone.forward` — a block of new tokens with explicit position offsets and an optional tree
  attention mask among the new tokens, against the cache; and :meth:`Backbone.compact`, which keeps only the
  accepted nodes of the block.

Classifier-free guidance (CFG) runs as *streams*: the conditional prompts and the unconditional prompt are
stacked along the batch axis, ``N = streams * B`` rows, conditional first. Every method that takes or
returns ``N`` rows uses that order; :func:`hawkspec.decoding.sampling.combine_cfg` merges the streams.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ImageGrid:
    """The token layout of one image body (between image start and image end).

    Attributes:
        rows: Image rows, in VQ codes.
        cols: Image columns, in VQ codes.
        eol: Whether every row is followed by a forced end-of-line token (Lumina-mGPT, Emu3, tiny).
    """

    rows: int
    cols: int
    eol: bool = True

    @property
    def tokens_per_row(self) -> int:
        """W: tokens per row, the end-of-line token included. A vertical head of depth d targets +d*W."""
        return self.cols + int(self.eol)

    @property
    def length(self) -> int:
        """Tokens in the image body: rows * W (end-of-line tokens included, image start/end excluded)."""
        return self.rows * self.tokens_per_row

    @property
    def num_codes(self) -> int:
        """Sampled (non-forced) positions per image: rows * cols."""
        return self.rows * self.cols

    def is_forced(self, j: torch.Tensor | int) -> torch.Tensor | bool:
        """Whether body position ``j`` (0-based) holds a forced end-of-line token."""
        if not self.eol:
            return torch.zeros_like(j, dtype=torch.bool) if isinstance(j, torch.Tensor) else False
        return (j % self.tokens_per_row) == self.cols

    def forced_mask(self) -> torch.Tensor:
        """(length,) bool: True at forced end-of-line positions."""
        return self.is_forced(torch.arange(self.length))

    def code_positions(self) -> torch.Tensor:
        """(rows*cols,) long: the body positions that hold sampled codes, in raster order."""
        return torch.nonzero(~self.forced_mask()).squeeze(1)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "eol": self.eol}


@dataclass
class KVState:
    """Decoding state of ``N = streams * B`` sequences sharing one KV cache.

    Attributes:
        cache: The transformers cache (a fixed-capacity ``StaticCache`` for :class:`~hawkspec.backbones.hf.
            HFBackbone`); slot ``i`` of every layer is column ``i`` of ``key_mask``.
        key_mask: (N, L) bool, True where cache slot ``i`` holds a committed token of that sequence. Left padding
            and slots not written yet are False.
        next_pos: (N,) long, the position id the next committed token of each sequence gets.
        streams: 1 without CFG, 2 with CFG (rows ``[0, B)`` conditional, ``[B, 2B)`` unconditional).
        ptr: (N,) long, each sequence's next free slot: its committed tokens fill ``[0, ptr)`` (with the prompt's
            left padding), and the next block is written at ``[ptr, ptr + T)``. Sequences advance by different
            amounts; every update is in place, so a compiled or graph-captured step keeps the same tensors.
    """

    cache: object
    key_mask: torch.Tensor
    next_pos: torch.Tensor
    streams: int = 1
    pending: int = field(default=0)
    """Slots appended by the last tree forward that :meth:`Backbone.compact` has not resolved yet (host
    bookkeeping, skipped inside a compiled or captured step)."""
    used: int = 0
    """A host-side upper bound of ``ptr`` (no device read): the room check reads ``ptr`` only when it is exceeded."""
    ptr: torch.Tensor | None = None
    slot_pos: torch.Tensor | None = None
    """(N, L) long, the position id of the token each cache slot holds (a large number where none was written):
    what a block with explicit ``positions`` (several image rows in flight) reads the cache by -- node ``i`` sees
    the committed slots whose position is at most its own."""

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0] // self.streams

    @property
    def capacity(self) -> int:
        """Slots the cache holds."""
        return self.key_mask.shape[1]


@dataclass
class PromptBatch:
    """An encoded batch of prompts: what :meth:`Backbone.encode` returns and :meth:`Backbone.prefill` takes.

    Opaque to everything outside ``backbones/``: only its length and :meth:`select` are used there.

    Attributes:
        cond: Per prompt, the token ids of the conditional stream, ending just before the image-start sequence.
        uncond: Per prompt, the ids of its unconditional (CFG) stream, same convention. Built per prompt: a
            backbone's unconditional prompt may depend on the prompt (Janus pads to the prompt's length).
        extras: Backbone-specific per-prompt data (e.g. text-encoder features), indexed like ``cond``.
    """

    cond: list[list[int]]
    uncond: list[list[int]]
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.cond) != len(self.uncond):
            raise ValueError(f"{len(self.cond)} conditional prompts but {len(self.uncond)} unconditional ones")

    def __len__(self) -> int:
        return len(self.cond)

    def select(self, index: list[int]) -> "PromptBatch":
        """The prompts at ``index`` (in that order, repeats allowed)."""
        return PromptBatch([self.cond[i] for i in index], [self.uncond[i] for i in index],
                           {k: [v[i] for i in index] for k, v in self.extras.items()})

    def streams(self, cfg: bool) -> list[list[int]]:
        """Token ids of every row of the batch, conditional rows first, then (with ``cfg``) unconditional."""
        return self.cond + (self.uncond if cfg else [])


class CodeHead(nn.Module):
    """A frozen map from last-layer hidden states to image-code logits: the code rows of an LM head.

    ``weight`` is (K, d), row ``k`` the LM-head row of code ``k`` (gathered through the vocabulary map, so
    code ids need not be contiguous); ``bias`` (K,) or None. Draft heads end in a copy of their backbone's
    code head (:meth:`Backbone.code_head`); a backbone whose codes are scored by another module (Janus'
    generation head) returns that module instead.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def num_codes(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., K)."""
        return nn.functional.linear(hidden, self.weight, self.bias)


class Backbone(nn.Module, abc.ABC):
    """A frozen AR text-to-image model as decoders, heads, the cache and the metrics see it.

    Nothing outside ``backbones/`` touches a model's internals: it sees encoded prompts (:meth:`encode`), a
    :class:`KVState`, last-layer hidden states, code logits (:meth:`code_logits`, :meth:`code_head`) and
    images (:meth:`decode_codes`, :meth:`encode_images`).

    Subclasses set these attributes in ``__init__``:
        name: Backbone family and size, e.g. ``"tiny"`` or ``"lumina-mgpt-7b-768"``.
        revision: A string identifying the weights (a hash or version), recorded in shard manifests and
            head checkpoints so heads are never used with another model.
        grid: The :class:`ImageGrid`.
        hidden_size: Width of the last-layer hidden states the draft heads read.
        code_token_ids: (K,) long buffer, the input id of image code ``k`` (never assumed contiguous).
        image_start_ids: The tokens between a prompt and the first image code (image start, size tokens...),
            possibly empty.
        eol_token_id: The forced end-of-line token, or None when ``grid.eol`` is False.
        image_end_id: The token after the last row, or None.
        max_length: The longest sequence (prompt + image) the model accepts.
        image_size: (height, width) in pixels of a decoded image.
    """

    name: str
    revision: str
    grid: ImageGrid
    hidden_size: int
    image_start_ids: list[int]
    eol_token_id: int | None
    image_end_id: int | None
    max_length: int
    image_size: tuple[int, int]

    # ----------------------------------------------------------------------------------------- prompts
    @abc.abstractmethod
    def encode(self, prompts: list[str]) -> PromptBatch:
        """Encode captions into a :class:`PromptBatch` (conditional and per-prompt unconditional streams)."""

    def sequence_length(self, prompts: PromptBatch) -> int:
        """Tokens the longest sequence of the batch takes: prompt, image start, body, image end."""
        longest = max(len(p) for p in prompts.cond + prompts.uncond)
        return longest + len(self.image_start_ids) + self.grid.length + int(self.image_end_id is not None)

    def check_prompt_lengths(self, prompts: PromptBatch) -> None:
        """Raise a ValueError naming the prompt when prompt + image would not fit the model's context."""
        need = len(self.image_start_ids) + self.grid.length + int(self.image_end_id is not None)
        for i, p in enumerate(prompts.cond + prompts.uncond):
            if len(p) + need > self.max_length:
                which = f"prompt {i}" if i < len(prompts) else f"the unconditional prompt of prompt {i - len(prompts)}"
                raise ValueError(
                    f"{which} has {len(p)} tokens; with the {need} image tokens it exceeds the context of "
                    f"{self.max_length} (the backbone's max_position_embeddings): shorten the prompt"
                )

    # ----------------------------------------------------------------------------------------- model
    @property
    def num_codes(self) -> int:
        """K: size of the image codebook."""
        return int(self.code_token_ids.numel())

    @abc.abstractmethod
    def code_head(self) -> nn.Module:
        """A new frozen module mapping hidden states (..., d) to code logits (..., K), equal to
        :meth:`code_logits`; draft heads end in it (so it is a copy that moves with them)."""

    @abc.abstractmethod
    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over image codes only, from the model's live weights. hidden: (..., d) -> (..., K)."""

    @abc.abstractmethod
    def prefill(self, prompts: PromptBatch, cfg: bool, reserve: int | None = None,
                round_to: int = 1, generator: torch.Generator | None = None) -> tuple[KVState, torch.Tensor]:
        """Run the prompts and the image-start sequence of a batch, and the unconditional stream if ``cfg``.

        Args:
            prompts: From :meth:`encode`.
            cfg: Also run the unconditional stream (rows ``[B, 2B)``).
            reserve: KV slots to reserve past the prompt, once (the body plus the largest tree block), so
                the cache never grows while decoding; None: the body and a modest tree.
            round_to: Round the cache's capacity up to a multiple of this, so batches whose prompts differ a
                little share one shape (what a compiled or graph-captured step is specialised to).
            generator: The decoder's generator, for a backbone that samples its image start
                (Lumina-mGPT's ``backbone.image_start=sampled``); the others draw nothing from it.

        Returns:
            The state after the image-start sequence, and the last hidden state of every row, (N, d): the one
            that predicts the first image code.
        """

    @abc.abstractmethod
    def forward(
        self,
        state: KVState,
        input_ids: torch.Tensor,
        tree_mask: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward a block of new tokens against the cache.

        Args:
            state: Updated in place: the block is appended to the cache.
            input_ids: (N, T) input ids (image codes as ``code_token_ids``).
            tree_mask: None for a linear block (each token sees all earlier ones; the block is committed and
                ``next_pos`` advances by T). Otherwise (T, T) or (N, T, T) bool, ``tree_mask[i, j]`` True if
                node i attends to node j (ancestors and itself); the block stays pending until
                :meth:`compact`.
            depth: (T,) or (N, T) long position offsets of the nodes from ``next_pos`` (tree depth). Defaults
                to ``arange(T)``.
            positions: (T,) or (N, T) long absolute position ids instead of ``depth``: a block whose tokens sit
                at non-contiguous raster positions (several image rows in flight, :mod:`hawkspec.decoding.rows`).
                The cache is then read raster-causally: node ``i`` sees the committed slots whose position is at
                most ``positions[i]`` (``KVState.slot_pos``), so tokens committed ahead of a lower position stay
                hidden from it; without ``tree_mask`` it also sees the block's nodes at positions up to its own,
                and the block is committed (``next_pos`` does not move: it belongs to the raster frontier); a
                committed token at a position the cache already holds replaces the one there.

        Returns:
            Last-layer hidden states, (N, T, d).
        """

    @abc.abstractmethod
    def compact(self, state: KVState, keep: torch.Tensor, count: torch.Tensor, prefix: bool = False) -> None:
        """Resolve a pending tree block: keep the accepted nodes, in order, and drop the rest.

        Args:
            keep: (N, A) long node indices into the pending block (padded arbitrarily past ``count``).
            count: (N,) long, how many of ``keep`` are real for each row; ``next_pos`` advances by it.
            prefix: the caller guarantees ``keep[:, j] == j`` for ``j < count`` (a chain block: the accepted
                nodes are its first ones, already in place), so no cache entry needs to move.
        """

    def compile_steps(self, mode: str = "forward") -> "Backbone":
        """Compile the decoding forwards (``"forward"``) or run them eagerly (``"none"``), for every decoder on this
        backbone alike. Adapters with static-shape forwards implement it."""
        if mode != "none":
            raise TypeError(f"{type(self).__name__} cannot compile its forwards (compile={mode!r}): use none")
        return self

    @torch.no_grad()
    def teacher_forced(self, prompts: PromptBatch, body: torch.Tensor, cfg: bool = False) -> torch.Tensor:
        """Last-layer hidden states over a known image body: :meth:`prefill` then one linear :meth:`forward`
        (the same code path decoding takes, so the states equal the ones decoding sees).

        Args:
            prompts: B prompts.
            body: (B, L) body input ids (``L <= grid.length``; codes as ``code_token_ids``, end-of-line tokens
                in place).
            cfg: Also run the unconditional stream.

        Returns:
            (streams*B, L + 1, d): row ``s + 1`` is the state after reading body position ``s``; row 0 the
            state after the image-start sequence.
        """
        if len(prompts) != body.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {body.shape[0]} image bodies")
        state, h0 = self.prefill(prompts, cfg=cfg, reserve=body.shape[1])
        h = self.forward(state, body.repeat(state.streams, 1)) if body.shape[1] else h0[:, None, :0]
        return torch.cat([h0.unsqueeze(1), h], dim=1)

    def body_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) code indices -> (B, rows*W) input ids, end-of-line tokens inserted."""
        B, rows, cols = codes.shape
        ids = self.code_token_ids[codes]  # (B, rows, cols)
        if self.grid.eol:
            eol = torch.full((B, rows, 1), self.eol_token_id, dtype=ids.dtype, device=ids.device)
            ids = torch.cat([ids, eol], dim=2)  # (B, rows, W)
        return ids.reshape(B, -1)

    def attention_maps(self, prompts: PromptBatch, body: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the body tokens, teacher-forced: (layers, B, heads, L, S) over the
        ``S`` sequence slots (prompt, image start, body). Optional: adapters that can return attention
        weights implement it (the analysis notebooks use it)."""
        raise TypeError(f"{type(self).__name__} does not expose attention weights")

    # ----------------------------------------------------------------------------------------- image side
    @abc.abstractmethod
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) code indices -> (B, 3, H, W) uint8 images."""

    def can_decode(self) -> tuple[bool, str]:
        """Whether :meth:`decode_codes` works, and if not, why (e.g. the VQ decoder checkpoint is not set)."""
        return True, ""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 images of :attr:`image_size` -> (B, rows, cols) code indices (the backbone's own
        VQ encoder): the cache's ``dataset`` source. Optional."""
        raise TypeError(f"{type(self).__name__} has no image encoder: use cache.source=self")

    @abc.abstractmethod
    def code_embeddings(self) -> torch.Tensor:
        """(K, d) input embeddings of the image codes (GSD's embedding-distance filter)."""

    @abc.abstractmethod
    def codebook_vectors(self) -> torch.Tensor:
        """(K, c) VQ codebook vectors (LANTERN's latent neighbours)."""

    def identity(self) -> dict:
        """What heads and shards record to refuse being used with another model."""
        return {
            "backbone": self.name,
            "revision": self.revision,
            "hidden_size": self.hidden_size,
            "grid": self.grid.to_dict(),
            "num_codes": self.num_codes,
        }


IDENTITY_KEYS = ("backbone", "revision", "hidden_size", "grid", "num_codes")


def check_identity(recorded: dict, backbone: "Backbone", what: str, fix: str) -> None:
    """Raise a ValueError listing every field where ``recorded`` (from heads or shards) differs from the
    backbone's :meth:`Backbone.identity`."""
    have = backbone.identity()
    diffs = [f"{k}={recorded[k]!r} (backbone: {have[k]!r})" for k in IDENTITY_KEYS if k in recorded and recorded[k] != have[k]]
    if diffs:
        raise ValueError(f"{what} was made with another backbone: " + "; ".join(diffs) + f". {fix}")
