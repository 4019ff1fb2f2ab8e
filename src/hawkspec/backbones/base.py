"""The backbone interface: the one abstraction every decoder, the cache writer and the heads talk to.

A backbone is a frozen autoregressive text-to-image model that writes an image as a raster of discrete
VQ codes laid out like Lumina-mGPT::

    [prompt tokens] [image start] (row of `cols` codes, end-of-line) x rows [image end]

Two things make speculative decoding possible on top of it, and both live here:

* :class:`KVState` — a KV cache plus a per-slot validity mask and the next position id of every sequence,
  so that a batch of sequences can accept different numbers of tokens per step (rejected tree nodes leave
  masked *holes* in the cache instead of forcing the batch to one length).
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
        cache: The transformers cache (:func:`~hawkspec.backbones.kv_cache.slab_cache`); slot ``i`` of every
            layer is column ``i`` of ``key_mask``.
        key_mask: (N, L) bool, True where cache slot ``i`` holds a token of that sequence. Left padding and
            rejected tree nodes are False (holes), so sequences may advance by different amounts.
        next_pos: (N,) long, the position id the next committed token of each sequence gets.
        streams: 1 without CFG, 2 with CFG (rows ``[0, B)`` conditional, ``[B, 2B)`` unconditional).
    """

    cache: object
    key_mask: torch.Tensor
    next_pos: torch.Tensor
    streams: int = 1
    pending: int = field(default=0)
    """Slots appended by the last tree forward that :meth:`Backbone.compact` has not resolved yet."""

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0] // self.streams

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]


class Backbone(nn.Module, abc.ABC):
    """A frozen AR text-to-image model as decoders see it.

    Subclasses set these attributes in ``__init__``:
        name: Backbone family and size, e.g. ``"tiny"`` or ``"lumina-mgpt-7b-768"``.
        revision: A string identifying the weights (a hash or version), recorded in shard manifests and
            head checkpoints so heads are never used with another model.
        grid: The :class:`ImageGrid`.
        hidden_size: Width of the last-layer hidden states the draft heads read.
        code_token_ids: (K,) long buffer, the vocabulary id of image code ``k``.
        eol_token_id, image_start_id, image_end_id: Layout tokens.
        max_length: The longest sequence (prompt + image) the model accepts.
    """

    name: str
    revision: str
    grid: ImageGrid
    hidden_size: int
    eol_token_id: int
    image_start_id: int
    image_end_id: int
    max_length: int

    # ----------------------------------------------------------------------------------------- prompts
    @abc.abstractmethod
    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Prompt token ids, each ending just before the image-start token."""

    @abc.abstractmethod
    def uncond_prompt_ids(self) -> list[int]:
        """Token ids of the unconditional (CFG) prompt, ending just before the image-start token."""

    # ----------------------------------------------------------------------------------------- model
    @property
    def num_codes(self) -> int:
        """K: size of the image codebook."""
        return int(self.code_token_ids.numel())

    @abc.abstractmethod
    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over image codes only. hidden: (..., d) -> (..., K)."""

    @abc.abstractmethod
    def prefill(self, prompt_ids: list[list[int]], cfg: bool) -> tuple[KVState, torch.Tensor]:
        """Run the prompts (+ image start) of a batch, and the unconditional stream if ``cfg``.

        Returns:
            The state after the image-start token, and the last hidden state of every row, (N, d).
        """

    @abc.abstractmethod
    def forward(
        self,
        state: KVState,
        input_ids: torch.Tensor,
        tree_mask: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward a block of new tokens against the cache.

        Args:
            state: Updated in place: the block is appended to the cache.
            input_ids: (N, T) vocabulary ids.
            tree_mask: None for a linear block (each token sees all earlier ones; the block is committed and
                ``next_pos`` advances by T). Otherwise (T, T) or (N, T, T) bool, ``tree_mask[i, j]`` True if
                node i attends to node j (ancestors and itself); the block stays pending until
                :meth:`compact`.
            depth: (T,) or (N, T) long position offsets of the nodes from ``next_pos`` (tree depth). Defaults
                to ``arange(T)``.

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

    # ----------------------------------------------------------------------------------------- image side
    @abc.abstractmethod
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) code indices -> (B, 3, H, W) uint8 images."""

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
