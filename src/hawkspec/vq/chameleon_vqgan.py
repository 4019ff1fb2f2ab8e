"""The image decoder of Chameleon's VQGAN (Lumina-mGPT's ``vqgan.ckpt``), which transformers does not ship.

transformers has Chameleon's VQ *encoder* (``ChameleonVQVAE``: encoder, ``quant_conv``, codebook) but no decoder,
so images sampled by Lumina-mGPT cannot be turned into pixels with transformers alone. This module is the
decoder side of the taming-transformers VQGAN that Chameleon's tokenizer is: codebook lookup, ``post_quant_conv``
and a convolutional decoder (a middle ResNet-attention-ResNet stage, then per resolution level
``num_res_blocks + 1`` ResNet blocks and a nearest-neighbour 2x upsampling, GroupNorm(32) + swish, 3x3 convs).
Its parameter names are the checkpoint's, so the official ``vqgan.ckpt`` (a Lightning checkpoint whose
``state_dict`` holds ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
``quantize.embedding.weight`` and, in training checkpoints, ``loss.*``) loads with no key renaming.

The architecture comes from the checkpoint's own ``vqgan.yaml`` (``model.params``: ``n_embed``, ``embed_dim`` and
``ddconfig`` with ``ch``, ``ch_mult``, ``num_res_blocks``, ``z_channels``, ``out_ch``, ``resolution``,
``attn_resolutions``); Chameleon's is ``ch=128, ch_mult=[1,1,2,2,4], num_res_blocks=2, z_channels=256,
attn_resolutions=[]``, 8192 codes of dimension 256, 16x downsampling.

Pixels: the decoder's output in [-1, 1] is clamped, mapped to [0, 1] and scaled by 255 with truncation to uint8
(what the official ``pil_from_img_toks`` does); :func:`images_to_vq_input` is the inverse used for encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Key prefixes of the checkpoint's state dict that belong to the decoder side (everything else is ignored).
DECODER_PREFIXES = ("decoder.", "post_quant_conv.", "quantize.embedding.")
#: Key prefixes of what transformers' ``ChameleonVQVAE`` holds (the encoder side, codebook and ``post_quant_conv``):
#: loaded into the model when its checkpoint lacks them.
ENCODER_PREFIXES = ("encoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.")


@dataclass(frozen=True)
class VQGANConfig:
    """The architecture of a Chameleon VQGAN (``vqgan.yaml`` ``model.params``, ``ddconfig`` flattened).

    Attributes:
        n_embed: Codebook size K.
        embed_dim: Codebook vector dimension.
        ch: Base channel count.
        ch_mult: Channel multiplier per resolution level (``len - 1`` 2x up-samplings).
        num_res_blocks: ResNet blocks per level in the encoder (the decoder has one more).
        z_channels: Latent channels (``post_quant_conv`` output, decoder input).
        out_ch: Image channels.
        resolution: The training resolution (only decides which levels have attention).
        attn_resolutions: Resolutions whose levels have attention blocks.
    """

    n_embed: int = 8192
    embed_dim: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    out_ch: int = 3
    resolution: int = 512
    attn_resolutions: tuple[int, ...] = field(default_factory=tuple)

    @property
    def downsample(self) -> int:
        """Pixels per latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "VQGANConfig":
        """Read ``vqgan.yaml`` (taming's layout: ``model.params.{n_embed, embed_dim, ddconfig}``)."""
        import yaml

        with open(path) as f:
            raw = yaml.safe_load(f)
        params = (raw.get("model") or {}).get("params") if isinstance(raw, dict) else None
        if not params or "ddconfig" not in params:
            raise ValueError(f"{path} is not a VQGAN config: expected model.params.ddconfig (taming's vqgan.yaml)")
        dd = params["ddconfig"]
        return cls(
            n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]), ch=int(dd["ch"]),
            ch_mult=tuple(int(m) for m in dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
            z_channels=int(dd["z_channels"]), out_ch=int(dd.get("out_ch", 3)), resolution=int(dd["resolution"]),
            attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions") or ()),
        )

    def to_yaml_dict(self) -> dict:
        """The ``vqgan.yaml`` content of this architecture (what :meth:`from_yaml` reads)."""
        return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
            "n_embed": self.n_embed, "embed_dim": self.embed_dim,
            "ddconfig": {"double_z": False, "z_channels": self.z_channels, "resolution": self.resolution,
                         "in_channels": 3, "out_ch": self.out_ch, "ch": self.ch, "ch_mult": list(self.ch_mult),
                         "num_res_blocks": self.num_res_blocks, "attn_resolutions": list(self.attn_resolutions),
                         "dropout": 0.0}}}}


def _norm(channels: int) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"VQGAN channel counts must be multiples of 32 (GroupNorm(32)), got {channels}")
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 ``nin_shortcut`` when the channel count changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 convs for q, k, v and the output)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # softmax(qk^T/sqrt(C)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * 2^(levels-1), ...), values about [-1, 1]."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        levels = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResBlock(block_in, block_in)
        ups: list[nn.Module] = [None] * levels  # type: ignore[list-item]
        for level in reversed(range(levels)):  # built lowest resolution first, stored by level index
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = c.ch * c.ch_mult[level]
            for _ in range(c.num_res_blocks + 1):
                up.block.append(ResBlock(block_in, block_out))
                block_in = block_out
                if res in c.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level:
                up.upsample = Upsample(block_in)
                res *= 2
            ups[level] = up
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Codebook(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)


class ChameleonVQGANDecoder(nn.Module):
    """Codes -> pixels: codebook lookup, ``post_quant_conv``, :class:`Decoder` (parameter names as in
    ``vqgan.ckpt``)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.quantize = _Codebook(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, embed_dim) the codebook vectors."""
        return self.quantize.embedding.weight

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """(B, rows, cols) code indices -> (B, 3, rows*f, cols*f) uint8 on the CPU (f = 2^(levels-1)),
        ``chunk`` images at a time."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be (B, rows, cols), got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_embed):
            raise ValueError(f"code indices must be in [0, {self.config.n_embed}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        w = self.post_quant_conv.weight
        out = []
        for part in codes.split(chunk):
            z = self.quantize.embedding(part.to(w.device)).permute(0, 3, 1, 2).to(w.dtype)  # (b, C, rows, cols)
            x = self.decoder(self.post_quant_conv(z)).float()
            out.append(vq_output_to_images(x).cpu())
        return torch.cat(out) if out else torch.empty(0, 3, 0, 0, dtype=torch.uint8)


def vq_output_to_images(x: torch.Tensor) -> torch.Tensor:
    """Decoder output about [-1, 1] -> uint8 [0, 255]: clamp, (x + 1) / 2, times 255, truncated (official)."""
    return ((x.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)


def images_to_vq_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> the encoder's input in [-1, 1] (x / 255 * 2 - 1, as the official tokenizer)."""
    return images.to(dtype=torch.float32).div(255).mul(2).sub(1).to(dtype)


def read_vqgan_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a VQGAN checkpoint: a Lightning ``.ckpt`` (``{"state_dict": ...}``), a plain torch
    state dict, or ``.safetensors``. Loaded with ``weights_only=True`` first; a Lightning checkpoint that stores
    other Python objects is retried with ``weights_only=False`` (only do this with files you trust)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a Lightning checkpoint with pickled hyper-parameters
        log.warning("%s does not load with weights_only=True (%s); loading it as a trusted pickle", path,
                    str(e).splitlines()[0][:200])
        raw = torch.load(path, map_location="cpu", weights_only=False)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no VQGAN state dict (expected a Lightning checkpoint with 'state_dict')")
    return state


def split_vqgan_state(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` whose key starts with one of ``prefixes``."""
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def load_vqgan_decoder(ckpt_path: str | Path, config_path: str | Path | None = None,
                       key: str = "backbone.vqgan_path") -> tuple[ChameleonVQGANDecoder, dict[str, torch.Tensor]]:
    """Load the decoder from the official checkpoint (and its ``vqgan.yaml``, by default next to it).

    Args:
        ckpt_path: ``vqgan.ckpt``, or a folder holding ``vqgan.ckpt`` and ``vqgan.yaml``.
        config_path: ``vqgan.yaml``; None looks next to the checkpoint.
        key: The config key named in errors.

    Returns:
        The decoder (float32, eval) and the entries of the checkpoint that transformers' ``ChameleonVQVAE`` holds
        (:data:`ENCODER_PREFIXES`), for a model whose own VQ encoder weights are missing.
    """
    ckpt = Path(ckpt_path)
    if ckpt.is_dir():
        ckpt = ckpt / "vqgan.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{key}={ckpt_path}: no VQGAN checkpoint at {ckpt} (Lumina-mGPT's "
                                "ckpts/chameleon/tokenizer/vqgan.ckpt)")
    cfg_path = Path(config_path) if config_path else ckpt.with_name("vqgan.yaml")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no VQGAN config {cfg_path} (vqgan.yaml beside {key}, or set backbone.vqgan_config)")
    config = VQGANConfig.from_yaml(cfg_path)
    state = read_vqgan_state(ckpt)
    model = ChameleonVQGANDecoder(config)
    wanted = split_vqgan_state(state, DECODER_PREFIXES)
    result = model.load_state_dict(wanted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{ckpt} does not match {cfg_path}: missing {result.missing_keys[:5]}"
                         f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}")
    log.info("VQGAN decoder loaded from %s (%d codes, %dx downsampling)", ckpt, config.n_embed, config.downsample)
    return model.eval().requires_grad_(False), split_vqgan_state(state, ENCODER_PREFIXES)


def save_vqgan(path: str | Path, decoder: ChameleonVQGANDecoder, encoder_state: dict[str, torch.Tensor]) -> Path:
    """Write ``vqgan.ckpt`` (``{"state_dict": ...}``, official key names) and ``vqgan.yaml`` to folder ``path``:
    what :func:`load_vqgan_decoder` reads (tests and the tiny random Chameleon use it)."""
    import yaml

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {**{k: v.detach().cpu().clone() for k, v in encoder_state.items()},
             **{k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}}
    torch.save({"state_dict": state}, path / "vqgan.ckpt")
    (path / "vqgan.yaml").write_text(yaml.safe_dump(decoder.config.to_yaml_dict(), sort_keys=False))
    return path / "vqgan.ckpt"
