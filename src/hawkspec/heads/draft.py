"""Draft heads: Medusa's horizontal heads and Hawk's vertical heads on the frozen model's hidden state.

Each head is a stack of ResBlocks ``x + SiLU(W x + b)`` with W and b zero-initialised (the head starts as the
identity, i.e. it first predicts what the LM head predicts), followed by the backbone's *frozen* code head
(:meth:`~hawkspec.backbones.base.Backbone.code_head`: the LM-head rows of the image codes, Medusa-2 style, or
the model's separate generation head). Every head has its own weights. Offsets: :mod:`.offsets`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hawkspec.backbones.base import check_identity
from hawkspec.heads.offsets import head_names, head_offsets
from hawkspec.io import check_finite_state, load_safetensors


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``, W and b zero-initialised."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


@dataclass(frozen=True)
class HeadsConfig:
    """Shape of a set of draft heads.

    Attributes:
        num_horizontal: n, horizontal heads (head k predicts k tokens after the next one); >= 1.
        vertical: Whether Hawk's vertical heads exist.
        vsd: Vertical speculation depth: vertical heads d = 1..vsd (d rows below); >= 1 when vertical.
        num_layers: ResBlocks per head.
    """

    num_horizontal: int = 4
    vertical: bool = True
    vsd: int = 2
    num_layers: int = 1

    @property
    def num_vertical(self) -> int:
        return self.vsd if self.vertical else 0

    def validate(self, rows: int | None = None) -> "HeadsConfig":
        """Raise a ValueError naming the key when the heads do not make sense (for this grid)."""
        if self.num_horizontal < 1:
            raise ValueError(f"heads.num_horizontal must be >= 1, got {self.num_horizontal}")
        if self.num_layers < 1:
            raise ValueError(f"heads.num_layers must be >= 1, got {self.num_layers}")
        if self.vertical and self.vsd < 1:
            raise ValueError(f"heads.vsd must be >= 1 when heads.vertical is true (got {self.vsd}); "
                             "set heads.vertical=false to drop the vertical heads")
        if self.vertical and rows is not None and self.vsd > rows - 1:
            raise ValueError(f"heads.vsd={self.vsd} reaches below the image: set heads.vsd <= image rows - 1 = {rows - 1}")
        return self


class DraftHeads(nn.Module):
    """Horizontal heads 1..n then vertical heads 1..vsd over the frozen code LM head.

    Args:
        config: Shapes.
        hidden_size: d, the backbone's hidden size.
        tokens_per_row: W (end-of-line included), fixes the vertical offsets.
        code_head: The backbone's frozen code head, (..., d) -> (..., K) (a copy; never trained, not saved).
        identity: The backbone's :meth:`~hawkspec.backbones.base.Backbone.identity`, saved with the heads.
    """

    def __init__(self, config: HeadsConfig, hidden_size: int, tokens_per_row: int, code_head: nn.Module,
                 identity: dict | None = None):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.tokens_per_row = tokens_per_row
        self.identity = identity or {}
        n_heads = config.num_horizontal + config.num_vertical
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(config.num_layers)]) for _ in range(n_heads)
        )
        self.code_head = code_head.requires_grad_(False)
        probe = next(iter(code_head.state_dict().values()), torch.zeros(()))
        with torch.no_grad():  # K, the codes the heads score
            self.num_codes = int(code_head(probe.new_zeros(1, hidden_size)).shape[-1])

    @classmethod
    def for_backbone(cls, config: HeadsConfig, backbone) -> "DraftHeads":
        config.validate(backbone.grid.rows)
        return cls(config, backbone.hidden_size, backbone.grid.tokens_per_row, backbone.code_head(),
                   backbone.identity())

    @property
    def device(self) -> torch.device:
        return self.blocks[0][0].linear.weight.device


    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The heads' own weights (the frozen code head belongs to the backbone and is not saved)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("code_head.")}

    @property
    def offsets(self) -> list[int]:
        """Target offset of each head, in output order (see :mod:`hawkspec.heads.offsets`)."""
        return head_offsets(self.config.num_horizontal, self.config.num_vertical, self.tokens_per_row)

    @property
    def names(self) -> list[str]:
        return head_names(self.config.num_horizontal, self.config.num_vertical)

    def _features(self, hidden: torch.Tensor, blocks) -> torch.Tensor:
        """(..., d) -> (..., H, d): the ResBlock stacks of ``blocks`` run together (one batched matmul per
        layer instead of one small matmul per head). Stacks the weights on every call, so autograd reaches them
        (training); decoding runs :meth:`frozen`'s stacks, made once."""
        layers = [self._stack(blocks, layer) for layer in range(self.config.num_layers)]
        return _run_stacks(hidden, layers)

    def _stack(self, blocks, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of ``blocks`` at ``layer`` stacked per head: (H, d_in, d_out) and (H, 1, d). Without autograd
        the transposed weights are made contiguous, the layout :meth:`frozen` keeps (one layout, one result)."""
        params = [p for blk in blocks for p in (blk[layer].linear.weight, blk[layer].linear.bias)]
        wt = torch.stack(params[0::2]).transpose(-1, -2)
        return (wt if torch.is_grad_enabled() else wt.contiguous()), torch.stack(params[1::2]).unsqueeze(1)

    def _weights_key(self) -> tuple:
        """What the stacked weights depend on: each parameter's memory, device, dtype and version (in-place updates,
        an optimizer step, bump ``_version``; ``.to`` moves the memory)."""
        return tuple((p.data_ptr(), p.device, p.dtype, p._version) for p in self.blocks.parameters())

    def frozen(self) -> "FrozenHeads":
        """The heads' weights stacked for decoding (:class:`FrozenHeads`), made once per version of the weights:
        a decoder takes it when it binds and asks again per batch, so every step reads stacks made before it
        (eager, compiled or replayed alike) and a module trained between batches is never decoded stale."""
        key = self._weights_key()
        cached = self.__dict__.get("_frozen")
        if cached is None or cached.key != key:
            with torch.no_grad():
                n = self.config.num_horizontal
                layers = [self._stack(self.blocks, layer) for layer in range(self.config.num_layers)]
                cached = FrozenHeads(key=key, code_head=self.code_head, every=tuple(layers),
                                     horizontal=tuple((wt[:n], b[:n]) for wt, b in layers))
            self.__dict__["_frozen"] = cached
        return cached

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., H, d): every head's ResBlock output (horizontal first, then vertical)."""
        return self._features(hidden, self.blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., H, K) code logits of every head (horizontal first, then vertical)."""
        return self.code_head(self.features(hidden))

    def _logits(self, hidden: torch.Tensor, blocks) -> torch.Tensor:
        return self.code_head(self._features(hidden, blocks))

    def horizontal(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., n, K): horizontal heads only (head k at index k-1)."""
        return self._logits(hidden, self.blocks[: self.config.num_horizontal])

    def vertical(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., vsd, K): vertical heads only (head d at index d-1)."""
        if not self.config.num_vertical:
            raise ValueError("these heads have no vertical heads (heads.vertical=false)")
        return self._logits(hidden, self.blocks[self.config.num_horizontal :])

    # ----------------------------------------------------------------------------------------- io
    def save(self, path: str | Path) -> Path:
        """Write ``heads.safetensors`` and ``heads.json`` (shapes + backbone identity) into folder ``path``."""
        return write_drafter(self, path, {"heads": asdict(self.config), "hidden_size": self.hidden_size,
                                          "tokens_per_row": self.tokens_per_row, "backbone": self.identity})

    @classmethod
    def load(cls, path: str | Path, backbone, key: str = "decoder.heads_path") -> "DraftHeads":
        """Load heads saved by :meth:`save` for ``backbone``; refuse heads trained on another backbone/grid.
        ``key``: the config key that points here, named by every error (a composed proposer's source has its own)."""
        meta = read_drafter_meta(path, "draft heads", "hawkspec-train", key)
        if "heads" not in meta:
            raise ValueError(f"{Path(path) / 'heads.json'} describes a {meta.get('kind', 'different')!r} drafter, not "
                             f"Medusa/Hawk heads: point `{key}` at heads written by hawkspec-train "
                             "heads=medusa|hawk (or use the matching decoder preset)")
        check_identity(meta.get("backbone", {}), backbone, f"the draft heads in {path} (`{key}`)",
                       "Train heads for this backbone (hawkspec-cache, hawkspec-train) or set the matching backbone.")
        heads = cls.for_backbone(HeadsConfig(**meta["heads"]), backbone)
        return load_drafter_weights(heads, path, "the draft heads", "hawkspec-train", key)


def _run_stacks(hidden: torch.Tensor, layers) -> torch.Tensor:
    """(..., d) -> (..., H, d) through per-layer stacked ResBlock weights ``layers`` [(wt (H, d, d), b (H, 1, d))]."""
    lead, d, H = hidden.shape[:-1], hidden.shape[-1], layers[0][0].shape[0]
    return _run_stacks_hm(hidden, layers).transpose(0, 1).reshape(*lead, H, d)


def _run_stacks_hm(hidden: torch.Tensor, layers) -> torch.Tensor:
    """(..., d) -> (H, M, d), heads first (M = the rows of ``hidden``): the layout the batched matmul leaves."""
    d, H = hidden.shape[-1], layers[0][0].shape[0]
    # heads on the batch dim of a bmm: (H, M, d) @ (H, d, d) -- no per-row copy of the weights, which a
    # broadcast (..., H, 1, d) @ (H, d, d) matmul would make
    x = hidden.reshape(1, -1, d).expand(H, -1, d)
    for wt, b in layers:
        x = x + nn.functional.silu(torch.baddbmm(b, x, wt))
    return x


@dataclass(frozen=True)
class FrozenHeads:
    """:class:`DraftHeads` as a decoding step reads them (:meth:`DraftHeads.frozen`): every layer's weights stacked
    per head once -- for all heads and for the horizontal ones -- so a step stacks nothing and checks nothing (no
    autograd: decoding only). The same layout as :meth:`DraftHeads.features` without autograd: the same results.

    Attributes:
        key: The weights' version it was made from (:meth:`DraftHeads._weights_key`).
        code_head: The heads' frozen code head.
        every, horizontal: Per layer ``(wt (H, d, d), b (H, 1, d))`` of all heads (horizontal first) and of heads
            1..n.
    """

    key: tuple
    code_head: nn.Module
    every: tuple
    horizontal: tuple

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., H, d), as :meth:`DraftHeads.features`."""
        return _run_stacks(hidden, self.every)

    def features_by_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (H, M, d): every head's ResBlock output, heads first, ``hidden``'s rows flattened (no copy
        into the (..., H, d) layout: a caller that picks rows picks them here)."""
        return _run_stacks_hm(hidden, self.every)

    def horizontal_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., n, K), as :meth:`DraftHeads.horizontal`."""
        return self.code_head(_run_stacks(hidden, self.horizontal))


# --------------------------------------------------------------------------------------------- drafter checkpoints
def write_drafter(module: nn.Module, path: str | Path, meta: dict) -> Path:
    """Folder ``path`` with ``heads.safetensors`` (the drafter's own weights: ``trained_state_dict()``, the frozen
    code head left out) and ``heads.json`` (``meta``: shapes and the backbone identity). Shared by every drafter."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.trained_state_dict().items()}, path / "heads.safetensors")
    (path / "heads.json").write_text(json.dumps(meta, indent=1))
    return path


def read_drafter_meta(path: str | Path, what: str, train_cmd: str, key: str = "decoder.heads_path") -> dict:
    """``heads.json`` of a drafter folder written by :func:`write_drafter`; a missing file names ``key``, the config
    key to set."""
    path = Path(path)
    for name in ("heads.safetensors", "heads.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{what} checkpoint is missing {path / name}: set `{key}` to a "
                                    f"folder written by `{train_cmd}`")
    return json.loads((path / "heads.json").read_text())


def load_drafter_weights(module: nn.Module, path: str | Path, what: str, train_cmd: str,
                         key: str = "decoder.heads_path") -> nn.Module:
    """Load ``heads.safetensors`` into ``module`` (built from the meta; its code head comes from the backbone),
    refusing mismatched or non-finite weights (naming ``key``, the config key that points here); returns it in
    eval mode."""
    path = Path(path)
    remake = (f"Remake it: `make heads` rewrites the shipped heads (src/hawkspec/assets/heads); for your own, rerun "
              f"the `{train_cmd}` run that exported it (export_dir=...), or point `{key}` at an intact export")
    state = load_safetensors(path / "heads.safetensors", f"{what} (`{key}`)", remake)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("code_head.")]
    if missing or unexpected:
        raise ValueError(f"{path / 'heads.safetensors'} (`{key}`) does not match {path / 'heads.json'}: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}; retrain ({train_cmd})")
    check_finite_state(module.state_dict(), f"{what} in {path}")  # NaN / Inf weights are refused
    return module.eval()
