"""An EAGLE-style draft model: one decoder layer over the target's features and the sampled tokens.

EAGLE (Li et al. 2024) drafts at the *feature* level: the draft model reads the target's last hidden state
``f_{i-1}`` together with the embedding of the token ``x_i`` that was sampled from it (the "shifted" token,
which removes the sampling uncertainty a feature alone has), predicts the next feature ``f_i``, and scores it
with the target's own frozen LM head (here the backbone's code head) to draft ``x_{i+1}``. Drafting runs
autoregressively on its own predicted features, with its own KV cache.

Layout (body positions as in :mod:`hawkspec.heads.offsets`; row ``i`` of the draft sequence is the pair
``(f_{i-1}, x_i)``, ``f_{-1}`` the state after the image-start sequence)::

    u_i   = fc(concat(f_{i-1}, e(x_i)[, f_{i+1-W}]))    # spatial: the target's state one row above x_{i+1}
    f^_i  = DecoderLayer(u_{<=i})_i                      # causal self-attention over the body, RoPE by position
    q_i   = code_head(f^_i)                              # the draft of x_{i+1}: Medusa head h1's target

``e`` is the backbone's frozen code embedding (:meth:`~hawkspec.backbones.base.Backbone.code_embeddings`); the
forced end-of-line token, which the interface does not embed, gets a learned vector. *Spatial EAGLE* (ours)
also feeds ``f_{i+1-W}``: the target's state at the token directly above the drafted one (what Hawk's vertical
head 1 reads to draft the same position), zeros above the first row. The decoder layer is Llama's (RMSNorm,
RoPE attention, SwiGLU MLP) written out here so that decoding can keep a KV cache indexed by body position
(per-row, rewindable for free); the first layer skips its input norm, as in EAGLE.

Saved like :class:`~hawkspec.heads.draft.DraftHeads` (``heads.safetensors`` + ``heads.json`` with the backbone
identity, ``"kind": "eagle"``), and refused for another backbone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from hawkspec.backbones.base import check_identity
from hawkspec.heads.draft import load_drafter_weights, read_drafter_meta, write_drafter

KIND = "eagle"


@dataclass(frozen=True)
class EagleConfig:
    """Shape of an EAGLE draft model.

    Attributes:
        spatial: Also read the target's hidden state one row above the drafted token (spatial EAGLE, ours).
        num_heads: Attention heads of the draft layer; None: head size 128 (or 64, 32, ... that divides d).
        intermediate_size: MLP width; None: 8/3 d rounded up to a multiple of 8 (Llama's ratio).
        rope_theta: RoPE base over body positions.
    """

    spatial: bool = False
    num_heads: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0

    def heads_for(self, d: int) -> int:
        if self.num_heads is not None:
            return self.num_heads
        for hd in (128, 64, 48, 32, 16, 8, 4, 2, 1):
            if d % hd == 0:
                return d // hd
        return 1

    def ffn_for(self, d: int) -> int:
        return self.intermediate_size or int(math.ceil(8 * d / 3 / 8) * 8)

    def validate(self, hidden_size: int | None = None) -> "EagleConfig":
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"heads.num_heads must be >= 1 or null, got {self.num_heads}")
        if hidden_size is not None and hidden_size % self.heads_for(hidden_size):
            raise ValueError(f"heads.num_heads={self.num_heads} does not divide the hidden size {hidden_size}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"heads.intermediate_size must be >= 1 or null, got {self.intermediate_size}")
        if self.rope_theta <= 0:
            raise ValueError(f"heads.rope_theta must be > 0, got {self.rope_theta}")
        return self


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's half-split convention). x: (B, h, M, hd), pos: (B, M) long."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)  # (hd/2,)
    ang = pos.float()[:, None, :, None] * inv  # (B, 1, M, hd/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@dataclass
class EagleKV:
    """The draft layer's KV cache of a batch, indexed by body position: (B, h, L + 1, hd) each. Slot ``L`` is a
    trash slot that padded queries write to; a query at position i attends to slots <= i, so stale drafts past
    the committed text are never read before they are overwritten (rewinds are free)."""

    k: torch.Tensor
    v: torch.Tensor


class DraftLayer(nn.Module):
    """Llama's decoder layer (no input norm: EAGLE's first layer) with a position-indexed KV cache."""

    def __init__(self, d: int, heads: int, ffn: int, theta: float, eps: float = 1e-6):
        super().__init__()
        self.h, self.hd, self.theta = heads, d // heads, theta
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        B, M, _ = x.shape
        split = lambda t: t.view(B, M, self.h, self.hd).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return rope(q, pos, self.theta), rope(k, pos, self.theta), v

    def _out(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        B, _, M, _ = att.shape
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, M, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A whole sequence, causal (training): x (B, S, d) at positions 0..S-1 -> (B, S, d)."""
        B, S, _ = x.shape
        pos = torch.arange(S, device=x.device).expand(B, S)
        q, k, v = self._qkv(x, pos)
        return self._out(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: torch.Tensor, pos: torch.Tensor, kv: EagleKV) -> torch.Tensor:
        """New rows x (B, M, d) at body positions pos (B, M) (padding: the trash slot): write their keys and
        values into ``kv``, then attend to every slot <= the query's position."""
        q, k, v = self._qkv(x, pos)
        B, M = pos.shape
        idx = pos[:, None, :, None].expand(B, self.h, M, self.hd)
        kv.k.scatter_(2, idx, k)
        kv.v.scatter_(2, idx, v)
        slots = torch.arange(kv.k.shape[2], device=x.device)
        mask = slots[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, M, L+1)
        return self._out(x, F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask))


class EagleDrafter(nn.Module):
    """The EAGLE draft model of one backbone (see the module docstring).

    Args:
        config: Shapes and the spatial flag.
        hidden_size: d.
        tokens_per_row: W (end-of-line included): the spatial input is W positions back.
        cols: Codes per row; with ``eol`` it fixes which body positions hold the forced token.
        eol: Whether rows end in a forced end-of-line token.
        code_head: The backbone's frozen code head (a copy; never trained, not saved).
        code_embeddings: (K, d) the backbone's input embeddings of the codes (a frozen copy, not saved).
        identity: The backbone's identity, saved with the weights.
    """

    #: Metric names and offsets in the heads' convention: the first draft of EAGLE predicts the token after the
    #: next one from the source feature, the target of Medusa's head h1 (so the val tables line up).
    names = ["h1"]
    offsets = [2]

    def __init__(self, config: EagleConfig, hidden_size: int, tokens_per_row: int, cols: int, eol: bool,
                 code_head: nn.Module, code_embeddings: torch.Tensor, identity: dict | None = None):
        super().__init__()
        config.validate(hidden_size)
        self.config, self.hidden_size, self.tokens_per_row = config, hidden_size, tokens_per_row
        self.cols, self.eol = cols, eol
        self.identity = identity or {}
        d = hidden_size
        self.fc = nn.Linear((3 if config.spatial else 2) * d, d, bias=True)
        self.layer = DraftLayer(d, config.heads_for(d), config.ffn_for(d), config.rope_theta)
        self.register_buffer("embed", code_embeddings.detach().clone().float(), persistent=False)
        self.eol_embedding = nn.Parameter(self.embed.mean(0).clone())
        self.code_head = code_head.requires_grad_(False)
        self.num_codes = int(self.embed.shape[0])

    @classmethod
    def for_backbone(cls, config: EagleConfig, backbone) -> "EagleDrafter":
        g = backbone.grid
        return cls(config, backbone.hidden_size, g.tokens_per_row, g.cols, g.eol, backbone.code_head(),
                   backbone.code_embeddings(), backbone.identity())

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def is_forced(self, pos: torch.Tensor) -> torch.Tensor:
        if not self.eol:
            return torch.zeros_like(pos, dtype=torch.bool)
        return (pos % self.tokens_per_row) == self.cols

    # ----------------------------------------------------------------------------------------- the model
    def token_embedding(self, codes: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """(...) code indices and forced flags -> (..., d); forced positions get the learned end-of-line vector."""
        e = self.embed.to(self.dtype)[codes.clamp(min=0)]
        return torch.where(forced.unsqueeze(-1), self.eol_embedding.to(self.dtype), e)

    def inputs(self, feat: torch.Tensor, tok: torch.Tensor, above: torch.Tensor | None) -> torch.Tensor:
        """fc(concat(feature, token embedding[, feature above]))."""
        parts = [feat, tok] + ([above] if self.config.spatial else [])
        return self.fc(torch.cat(parts, dim=-1))

    def sequence_inputs(self, hidden: torch.Tensor, codes: torch.Tensor, noise: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple:
        """Teacher-forced draft rows of whole bodies (training).

        Args:
            hidden: (B, L + 1, d) cached target states (row 0: after the image start; row s + 1: after body s).
            codes: (B, L) body codes, -1 at forced positions.
            noise: EAGLE's uniform feature noise: ``(U[0, 1) - 0.5) * noise`` added to the input features.

        Returns:
            (feat, tok, above) for rows i = 0 .. L-1: f_{i-1}, e(x_i) and f_{i+1-W} (zeros above the image).
        """
        B, S, d = hidden.shape
        L, W = S - 1, self.tokens_per_row
        feat = hidden.to(self.dtype)
        if noise:
            feat = feat + (torch.rand(feat.shape, generator=generator, device=feat.device, dtype=feat.dtype) - 0.5) * noise
        pos = torch.arange(L, device=hidden.device)
        tok = self.token_embedding(codes.long(), self.is_forced(pos).expand(B, L))
        above = None
        if self.config.spatial:
            src = pos + 2 - W  # hidden row of f_{i+1-W}
            above = torch.where((src >= 0)[None, :, None], feat[:, src.clamp(min=0)], 0.0)
        return feat[:, :L], tok, above

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor, noise: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Predicted features f^_i, (B, L, d), of whole teacher-forced bodies (see :meth:`sequence_inputs`)."""
        return self.layer(self.inputs(*self.sequence_inputs(hidden, codes, noise, generator)))

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """Code logits of features (..., d) -> (..., K) float32, through the frozen code head in its own dtype (a
        bf16 backbone's head under a float32 draft layer)."""
        probe = next(iter([*self.code_head.buffers(), *self.code_head.parameters()]), None)
        return self.code_head(f if probe is None else f.to(probe.dtype)).float()

    def new_cache(self, batch_size: int, length: int) -> EagleKV:
        """An empty KV cache for ``batch_size`` bodies of ``length`` positions (plus the trash slot)."""
        shape = (batch_size, self.layer.h, length + 1, self.layer.hd)
        z = torch.zeros(shape, device=self.device, dtype=self.dtype)
        return EagleKV(z, z.clone())

    def step(self, x: torch.Tensor, pos: torch.Tensor, kv: EagleKV) -> torch.Tensor:
        """Decoding: rows x (B, M, d) (from :meth:`inputs`) at body positions pos (B, M) -> f^ (B, M, d)."""
        return self.layer.step(x, pos, kv)

    # ----------------------------------------------------------------------------------------- io
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("code_head.")}

    def save(self, path: str | Path) -> Path:
        """Write ``heads.safetensors`` and ``heads.json`` (kind, shapes, backbone identity) into folder ``path``."""
        return write_drafter(self, path, {"kind": KIND, "eagle": asdict(self.config), "hidden_size": self.hidden_size,
                                          "tokens_per_row": self.tokens_per_row, "backbone": self.identity})

    @classmethod
    def load(cls, path: str | Path, backbone, key: str = "decoder.heads_path") -> "EagleDrafter":
        """Load a draft model saved by :meth:`save` for ``backbone``; refuse one of another backbone, or heads.
        ``key``: the config key that points here, named by every error (``decoder.eagle_path`` in ``hawk_eagle``)."""
        meta = read_drafter_meta(path, "EAGLE", "hawkspec-train heads=eagle", key)
        if meta.get("kind") != KIND:
            raise ValueError(f"{path} holds draft heads, not an EAGLE draft model (heads.json has no \"kind\": "
                             f"\"eagle\"): set `{key}` to the export of `hawkspec-train heads=eagle`")
        check_identity(meta.get("backbone", {}), backbone, f"the EAGLE draft model in {path} (`{key}`)",
                       "Train it for this backbone (hawkspec-cache, hawkspec-train heads=eagle) or set the matching "
                       "backbone.")
        model = cls.for_backbone(EagleConfig(**meta["eagle"]), backbone)
        return load_drafter_weights(model, path, "the EAGLE draft model", "hawkspec-train heads=eagle", key)
