"""LlamaGen text-to-image (FoundationVision, GPT-XL 0.78B), ported onto transformers' Llama classes.

LlamaGen is not in transformers. Its official ``autoregressive/models/gpt.py`` (model_type ``t2i``) is a Llama
decoder with three differences, each reproduced here:

* **Fused projections**: ``attention.wqkv`` is split at load into ``q_proj``/``k_proj``/``v_proj``; the SwiGLU
  ``w1``/``w3``/``w2`` become ``gate_proj``/``up_proj``/``down_proj``.
* **2-D rotary positions** (``precompute_freqs_cis_2d``): an image token at raster index ``i`` rotates the first
  half of each head's frequency pairs by its row and the second half by its column; the 120 caption positions get
  a zero table (cos = sin = 0, so caption queries and keys are zero: every caption key scores 0). Official rotary
  pairs are interleaved (``x[2j], x[2j+1]``); transformers rotates halves, so the q/k rows are permuted at load
  (the standard Llama conversion) and :class:`LlamaGen2DRotary` serves cos/sin in the half layout. Positions past
  the table (tree nodes beyond the last row) are clamped to its last row: never committed, never out of range.
* **Caption prefix**: 120 FLAN-T5-XL features (``cls_embedding.cap_proj``, a tanh-GELU MLP) instead of tokens; no
  image-start token; the first code is predicted from the last caption position. Prompts are left-padded inside
  the 120 slots (official ``sample_t2i.py``: the padded slots are zeroed and masked as keys). CFG's unconditional
  row is the learned ``uncond_embedding`` (120 x 2048) with the prompt's own mask (official ``generate``:
  ``cat([emb_masks, emb_masks])``).

Text features come from a local FLAN-T5 encoder (``t5_path``), as the official ``T5Embedder`` makes them:

* every caption is cleaned first (:func:`clean_caption`: the official ``text_preprocessing``, the DeepFloyd/PixArt
  ``clean_caption`` with ftfy and BeautifulSoup, applied twice; ``backbone.clean_caption=false`` only lower-cases
  and strips, the official ``use_text_preprocessing=False``). 25 of the 1,632 PartiPrompts read differently
  cleaned ("U.S. 101" -> "u. s. 101", "2x2 emoji" -> "emoji", curly quotes -> ASCII, a final quote dropped);
* then tokenised to 120 tokens with ``padding="max_length", truncation=True``: a longer caption keeps its first
  119 tokens and ``</s>``, as the official code does silently (a warning here; ``backbone.strict_length=true``
  makes it an error naming the prompt).

The VQ is LlamaGen's VQ-16, whose architecture transformers ships as Janus' VQ-VAE (Janus reuses it): the official
``vq_ds16_t2i.pt`` keys are mapped onto ``JanusVQVAE``; decoded pixels are rounded to uint8 as the official
evaluation script writes them (:func:`to_uint8_rounded`). Official sampling (``conf/sampling/llamagen.yaml``):
CFG 7.5 (guidance only when ``cfg_scale > 1``: ``sampling.cfg_off_below_one``), top-k 1000, T 1, top-p 1 (off).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hawkspec.backbones.base import ImageGrid, PromptBatch
from hawkspec.backbones.hf import HFBackbone
from hawkspec.backbones.loading import require_dir, resolve_dtype, weights_hash, word_tokenizer

log = logging.getLogger(__name__)

CAPTION_TOKENS = 120
#: Official GPT configs (gpt.py); t2i checkpoints exist for GPT-XL.
GPT_CONFIGS = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
}
#: Official t2i resolutions: image size -> latent grid side (VQ-16 downsamples by 16).
RESOLUTIONS = {256: 16, 512: 32}


# --------------------------------------------------------------------------------------------- captions
# LlamaGen's T5Embedder cleans every caption before tokenising it (``text_preprocessing``: the DeepFloyd-IF /
# PixArt ``clean_caption``, run twice, "the exact text cleaning as was in the training stage"). The steps below
# reproduce its decisions in its order; each is (pattern, replacement) applied with ``re.sub`` to the whole caption.
_DASHES = ("\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"  # the hyphen first: literal
           "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d")
_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_MEDIA = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_BEFORE_HTML = [  # after unquoting and lower-casing
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", ""),  # URLs
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL + r"))", ""),
]
_BEFORE_FIX = [  # after BeautifulSoup has dropped the markup
    (r"@[\w\d]+\b", ""),  # @nickname
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes .. unified ideographs (U+31C0-U+9FFF, one contiguous block)
    ("[" + _DASHES + "]+", "-"),  # every kind of dash, runs included -> one hyphen
    (r"[`´«»“”¨]", '"'),  # quotes -> one standard
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _MEDIA, ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+", " "),  # runs of odd punctuation
    (r"\s+\.\s+", " "),
]
_AFTER_FIX = [  # after ftfy and HTML unescaping
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _MEDIA + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes such as 1920x1080 (Latin x, Cyrillic х, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # one pair of surrounding quotes
    (r"^['_,\-:;]", ""),
    (r"['_,\-:+]$", ""),
    (r"^\.\S+$", ""),
]
_CLEANING = tuple([(re.compile(a), b) for a, b in steps] for steps in (_BEFORE_HTML, _BEFORE_FIX, _AFTER_FIX))
_JOINERS = re.compile(r"[-_]")


def clean_caption_once(caption: str) -> str:
    """One pass of the official caption cleaning (LlamaGen ``language/t5.py``, ``T5Embedder.clean_caption``):
    URL-unquote (``+`` reads as a space) and lower-case; drop URLs, HTML markup (BeautifulSoup), @names, CJK,
    IPs, ids, file names, shop boilerplate ("free shipping", "click for ...") and sizes ("1920x1080"); unify dashes
    and quotes; turn runs of odd punctuation into spaces; ``a-b-c-d-e`` / ``a_b_c`` (more than three ``-``/``_``)
    into words; ftfy and double HTML unescaping; one space between words."""
    import html
    import urllib.parse

    try:
        import ftfy
        from bs4 import BeautifulSoup
    except ImportError as e:  # both are dependencies of hawkspec; a trimmed environment says what to do
        raise ImportError(f"LlamaGen's caption cleaning needs ftfy and beautifulsoup4 ({e}); install them or set "
                          "backbone.clean_caption=false (captions then only lower-cased and stripped)") from e
    before_html, before_fix, after_fix = _CLEANING
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    for pattern, repl in before_html:
        text = pattern.sub(repl, text)
    with warnings.catch_warnings():  # a caption that looks like a URL or a file name is still just text
        warnings.simplefilter("ignore")
        text = BeautifulSoup(text, features="html.parser").text
    for pattern, repl in before_fix:
        text = pattern.sub(repl, text)
    if len(_JOINERS.findall(text)) > 3:  # this-is-my-cute-cat -> words
        text = _JOINERS.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    for pattern, repl in after_fix:
        text = pattern.sub(repl, text)
    return text.strip()


def clean_caption(caption: str) -> str:
    """The official LlamaGen caption preprocessing: :func:`clean_caption_once` twice (as ``text_preprocessing``)."""
    return clean_caption_once(clean_caption_once(caption))


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    """The official SwiGLU width: int(2 * 4 * dim / 3) rounded up to a multiple of 256."""
    return find_multiple(int(2 * (4 * dim) / 3), multiple_of)


def freqs_cis_2d(rows: int, cols: int, head_dim: int, base: float = 10000.0,
                 cls_token_num: int = CAPTION_TOKENS) -> torch.Tensor:
    """The official ``precompute_freqs_cis_2d`` table, (cls + rows*cols, head_dim // 2, 2) of (cos, sin) per
    interleaved pair; square in the official code, rows x cols here (row frequencies first, then column ones)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    fr = torch.outer(torch.arange(rows).float(), freqs)  # (rows, head_dim // 4)
    fc = torch.outer(torch.arange(cols).float(), freqs)
    grid = torch.cat([fr[:, None, :].expand(-1, cols, -1), fc[None, :, :].expand(rows, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), cache])


class LlamaGen2DRotary(nn.Module):
    """Replaces ``LlamaModel.rotary_emb``: position id -> (cos, sin) in transformers' rotate-half layout, from the
    official 2-D table (zeros for the caption positions). Position ids past the table are clamped to its last row."""

    def __init__(self, rows: int, cols: int, head_dim: int, base: float = 10000.0,
                 cls_token_num: int = CAPTION_TOKENS):
        super().__init__()
        table = freqs_cis_2d(rows, cols, head_dim, base, cls_token_num)  # (P, head_dim // 2, 2)
        cos, sin = table[..., 0], table[..., 1]
        self.register_buffer("cos_table", torch.cat([cos, cos], dim=-1), persistent=False)  # (P, head_dim)
        self.register_buffer("sin_table", torch.cat([sin, sin], dim=-1), persistent=False)

    @property
    def num_positions(self) -> int:
        return self.cos_table.shape[0]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        idx = position_ids.clamp(0, self.num_positions - 1)
        return self.cos_table[idx].to(x.dtype), self.sin_table[idx].to(x.dtype)


class CaptionMLP(nn.Module):
    """``cls_embedding.cap_proj``: Linear (no bias), tanh-GELU, Linear (no bias)."""

    def __init__(self, caption_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(caption_dim, dim, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LlamaGenT2I(nn.Module):
    """The port: a ``LlamaForCausalLM`` over the K image codes, the caption MLP and the unconditional embedding."""

    def __init__(self, llama, caption_dim: int, rows: int, cols: int, rope_base: float = 10000.0):
        super().__init__()
        cfg = llama.config
        self.llama = llama
        self.caption_proj = CaptionMLP(caption_dim, cfg.hidden_size)
        self.register_buffer("uncond_embedding", torch.zeros(CAPTION_TOKENS, caption_dim))
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        llama.model.rotary_emb = LlamaGen2DRotary(rows, cols, head_dim, rope_base)

    @classmethod
    def build(cls, dim: int, n_layer: int, n_head: int, num_codes: int, caption_dim: int, rows: int, cols: int,
              n_kv_head: int | None = None, norm_eps: float = 1e-5, rope_base: float = 10000.0,
              intermediate_size: int | None = None, attn_implementation: str = "sdpa") -> "LlamaGenT2I":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=num_codes, hidden_size=dim, intermediate_size=intermediate_size or ffn_hidden(dim),
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head or n_head,
            max_position_embeddings=CAPTION_TOKENS + rows * cols, rms_norm_eps=norm_eps, hidden_act="silu",
            attention_bias=False, mlp_bias=False, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
            eos_token_id=None, attn_implementation=attn_implementation,
        )
        return cls(LlamaForCausalLM(config), caption_dim, rows, cols, rope_base)

    # --------------------------------------------------------------------------- official checkpoint keys
    def load_official_state_dict(self, sd: dict, strict: bool = True) -> None:
        """Load the official ``gpt.py`` state dict (``checkpoint["model"]``): split ``wqkv``, permute q/k rows for
        the rotate-half rotary, rename the rest. Unknown keys are an error (``strict``)."""
        cfg = self.llama.config
        dim, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        hd = dim // H
        out, unknown = {}, []

        def permute(w, heads):  # interleaved pairs (2j, 2j+1) -> halves (j, j + hd/2), per head
            return w.view(heads, hd // 2, 2, w.shape[1]).transpose(1, 2).reshape(heads * hd, w.shape[1])

        for k, v in sd.items():
            m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
            if m:
                i, rest = m.groups()
                p = f"llama.model.layers.{i}."
                if rest == "attention.wqkv.weight":
                    q, kk, vv = v.split([H * hd, KV * hd, KV * hd], dim=0)
                    out[p + "self_attn.q_proj.weight"] = permute(q, H)
                    out[p + "self_attn.k_proj.weight"] = permute(kk, KV)
                    out[p + "self_attn.v_proj.weight"] = vv
                    continue
                name = {"attention.wo.weight": "self_attn.o_proj.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
                        "feed_forward.w3.weight": "mlp.up_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                        "attention_norm.weight": "input_layernorm.weight",
                        "ffn_norm.weight": "post_attention_layernorm.weight"}.get(rest)
                if name is None:
                    if "kv_cache" not in rest:
                        unknown.append(k)
                    continue
                out[p + name] = v
                continue
            name = {"tok_embeddings.weight": "llama.model.embed_tokens.weight", "norm.weight": "llama.model.norm.weight",
                    "output.weight": "llama.lm_head.weight", "cls_embedding.uncond_embedding": "uncond_embedding",
                    "cls_embedding.cap_proj.fc1.weight": "caption_proj.fc1.weight",
                    "cls_embedding.cap_proj.fc2.weight": "caption_proj.fc2.weight"}.get(k)
            if name is None:
                if k not in ("freqs_cis", "causal_mask"):
                    unknown.append(k)
                continue
            out[name] = v
        missing, unexpected = self.load_state_dict(out, strict=False)
        missing = [k for k in missing if not k.endswith(("cos_table", "sin_table"))]
        if strict and (unknown or missing or unexpected):
            raise ValueError(f"the LlamaGen checkpoint does not match the port: unknown keys {unknown[:5]}, "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]} (check backbone.gpt_model)")


def _official_state_dict(self) -> dict:
    """The inverse of :meth:`LlamaGenT2I.load_official_state_dict`: official ``gpt.py`` keys (fused ``wqkv``)."""
    cfg = self.llama.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H

    def unpermute(w, heads):
        return w.view(heads, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(heads * hd, w.shape[1])

    sd = {"tok_embeddings.weight": self.llama.model.embed_tokens.weight, "norm.weight": self.llama.model.norm.weight,
          "output.weight": self.llama.lm_head.weight, "cls_embedding.uncond_embedding": self.uncond_embedding,
          "cls_embedding.cap_proj.fc1.weight": self.caption_proj.fc1.weight,
          "cls_embedding.cap_proj.fc2.weight": self.caption_proj.fc2.weight}
    for i, layer in enumerate(self.llama.model.layers):
        a, m = layer.self_attn, layer.mlp
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [unpermute(a.q_proj.weight, H), unpermute(a.k_proj.weight, KV), a.v_proj.weight])
        sd[f"layers.{i}.attention.wo.weight"] = a.o_proj.weight
        sd[f"layers.{i}.feed_forward.w1.weight"] = m.gate_proj.weight
        sd[f"layers.{i}.feed_forward.w3.weight"] = m.up_proj.weight
        sd[f"layers.{i}.feed_forward.w2.weight"] = m.down_proj.weight
        sd[f"layers.{i}.attention_norm.weight"] = layer.input_layernorm.weight
        sd[f"layers.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
    return {k: v.detach().clone() for k, v in sd.items()}


LlamaGenT2I.official_state_dict = _official_state_dict


# --------------------------------------------------------------------------------------------- VQ-16
def to_uint8_rounded(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> uint8 as LlamaGen's ``sample_t2i_ddp.py`` writes the evaluation images:
    ``torch.clamp(127.5 * x + 128.0, 0, 255)`` cast to uint8 (in float32, the VQ decoder's dtype there). The cast
    floors, so this rounds ``(x + 1) * 127.5`` half up; the generic ``(x + 1) / 2 * 255`` cast truncates, a pixel
    one level darker about half the time. (``sample_t2i.py``'s ``save_image(normalize=True)`` adds 0.5 after
    clamping to [-1, 1]: the same rounding.)"""
    return (127.5 * pixels.float() + 128.0).clamp(0, 255).to(torch.uint8)


def vq_config(num_codes: int = 16384, embed_dim: int = 8, base_channels: int = 128,
              channel_multiplier=(1, 1, 2, 2, 4), z_channels: int = 256, num_res_blocks: int = 2):
    """LlamaGen VQ-16 as a ``JanusVQVAEConfig`` (the same encoder/decoder; Janus ships LlamaGen's tokenizer)."""
    from transformers import JanusVQVAEConfig

    return JanusVQVAEConfig(embed_dim=embed_dim, num_embeddings=num_codes, latent_channels=z_channels,
                            base_channels=base_channels, channel_multiplier=list(channel_multiplier),
                            num_res_blocks=num_res_blocks, dropout=0.0)


def vq_key(k: str) -> str | None:
    """Official ``vq_model.py`` key -> ``JanusVQVAE`` key (None: a key to drop, e.g. ``codebook_used``)."""
    if k == "quantize.codebook_used":
        return None
    k = re.sub(r"^(encoder)\.conv_blocks\.(\d+)\.res\.", r"\1.down.\2.block.", k)
    k = re.sub(r"^(encoder)\.conv_blocks\.(\d+)\.", r"\1.down.\2.", k)
    k = re.sub(r"^(decoder)\.conv_blocks\.(\d+)\.res\.", r"\1.up.\2.block.", k)
    k = re.sub(r"^(decoder)\.conv_blocks\.(\d+)\.", r"\1.up.\2.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2.", k)
    return k


def vq_official_key(k: str) -> str:
    """``JanusVQVAE`` key -> official ``vq_model.py`` key (the inverse of :func:`vq_key`)."""
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.", r"decoder.conv_blocks.\1.res.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.", r"decoder.conv_blocks.\1.", k)
    for i, name in enumerate(("block_1", "attn_1", "block_2")):
        k = re.sub(rf"^(encoder|decoder)\.mid\.{name}\.", rf"\1.mid.{i}.", k)
    return k


def load_vq(sd: dict, config, rows: int, cols: int):
    """A ``JanusVQVAE`` holding the official VQ-16 weights ``sd`` (``checkpoint["model"]``)."""
    from transformers import JanusVQVAE

    vq = JanusVQVAE(config).eval().requires_grad_(False)
    mapped = {vq_key(k): v for k, v in sd.items() if vq_key(k) is not None}
    missing, unexpected = vq.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(f"the LlamaGen VQ checkpoint does not match VQ-16: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (check backbone.vq_path)")
    vq.quantize.quant_state_dims = [rows, cols]
    return vq


def _torch_load(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # official .pt files may pickle training args next to the weights
        log.warning("%s is not a plain tensor checkpoint; loading it with weights_only=False (trusted local file)", path)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def _require_file(path, key: str) -> Path:
    if path is None or str(path) in ("", "???"):
        raise FileNotFoundError(f"`{key}` is not set: point it at a local file (weights are never downloaded)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"`{key}`={path} is not a file")
    return p


# --------------------------------------------------------------------------------------------- the adapter
class LlamaGenBackbone(HFBackbone):
    """LlamaGen t2i as a :class:`~hawkspec.backbones.base.Backbone` (see the module docstring).

    Input ids: image code ``k`` is id ``k``; the 120 caption slots of a prompt are placeholder ids (``K`` padding,
    ``K + 1`` a caption feature, ``K + 2`` the unconditional embedding) that only :meth:`prefill` reads, with the
    T5 features in ``PromptBatch.extras["caption"]``.

    Args:
        model: A :class:`LlamaGenT2I`.
        vq: A ``JanusVQVAE`` with the VQ-16 weights (or None: :meth:`decode_codes` then says why it cannot).
        t5: A ``T5EncoderModel`` (FLAN-T5-XL) and ``t5_tokenizer`` its tokenizer.
        rows, cols: The latent grid (16 x 16 at 256 px, 32 x 32 at 512 px).
        clean_caption: Clean captions as the official ``T5Embedder`` (:func:`clean_caption`, twice); False: only
            lower-case and strip them.
        strict_length: Refuse a caption longer than 120 T5 tokens; False (default): cut it to 120 (119 tokens and
            ``</s>``) as the official code does, with a warning.
    """

    def __init__(self, model: LlamaGenT2I, vq, t5, t5_tokenizer, rows: int, cols: int, name: str = "llamagen-t2i",
                 revision: str | None = None, clean_caption: bool = True, strict_length: bool = False,
                 vq_downsample: int = 16):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.vq = vq.eval().requires_grad_(False) if vq is not None else None
        self.t5 = t5.eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.clean_caption = bool(clean_caption)
        self.strict_length = bool(strict_length)
        K = model.llama.config.vocab_size
        self.register_buffer("code_token_ids", torch.arange(K), persistent=False)
        self.PAD_SLOT, self.CAPTION_SLOT, self.NULL_SLOT = K, K + 1, K + 2
        self.pad_token_id = self.PAD_SLOT
        self.grid = ImageGrid(int(rows), int(cols), eol=False)
        self.name = name
        self.hidden_size = model.llama.config.hidden_size
        self.image_start_ids, self.eol_token_id, self.image_end_id = [], None, None
        self.max_length = CAPTION_TOKENS + self.grid.num_codes
        self.image_size = (rows * vq_downsample, cols * vq_downsample)
        self.revision = revision or weights_hash(model)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, gpt_path, t5_path, vq_path=None, image_size: int = 256, gpt_model: str = "GPT-XL",
                        dtype: str = "bfloat16", t5_dtype: str = "bfloat16", attn_implementation: str = "sdpa",
                        name: str | None = None, revision: str | None = None, clean_caption: bool = True,
                        strict_length: bool = False, arch: dict | None = None, vq_arch: dict | None = None,
                        latent_size: int | None = None) -> "LlamaGenBackbone":
        """Load the official checkpoints from disk (never downloaded).

        Args:
            gpt_path: ``t2i_XL_stage1_256.pt`` (256 px) or ``t2i_XL_stage2_512.pt`` (512 px), or a safetensors file
                with the same keys.
            t5_path: Folder of a transformers FLAN-T5 model (``google/flan-t5-xl``): the encoder and tokenizer.
            vq_path: ``vq_ds16_t2i.pt``; None: no image decoding (:meth:`can_decode` says so).
            image_size: 256 or 512 (16 x 16 / 32 x 32 codes); anything else is an error naming the key.
            gpt_model: The official GPT config name (GPT-XL for the released t2i checkpoints).
            clean_caption, strict_length: ``backbone.clean_caption`` (official caption cleaning, default on) and
                ``backbone.strict_length`` (refuse, rather than truncate, captions over 120 T5 tokens).
            arch, vq_arch, latent_size: Overrides for other sizes (``dim``/``n_layer``/``n_head``/
                ``intermediate_size``; VQ ``base_channels``/``channel_multiplier``/``z_channels``/``num_res_blocks``/
                ``embed_dim``; the grid side), e.g. a small test checkpoint.
        """
        from transformers import AutoTokenizer, T5EncoderModel

        if latent_size is None:
            if int(image_size) not in RESOLUTIONS:
                raise ValueError(f"backbone.image_size={image_size}: LlamaGen t2i generates {sorted(RESOLUTIONS)} px "
                                 "only")
            side = RESOLUTIONS[int(image_size)]
        else:
            side = int(latent_size)
        if gpt_model not in GPT_CONFIGS:
            raise ValueError(f"backbone.gpt_model={gpt_model!r}: one of {sorted(GPT_CONFIGS)}")
        gpt_file = _require_file(gpt_path, "backbone.gpt_path")
        t5_dir = require_dir(t5_path, "backbone.t5_path")
        vq_file = _require_file(vq_path, "backbone.vq_path") if vq_path is not None else None
        t5 = T5EncoderModel.from_pretrained(t5_dir, dtype=resolve_dtype(t5_dtype))
        tok = AutoTokenizer.from_pretrained(t5_dir)
        sd = _torch_load(gpt_file)
        num_codes = int(sd["tok_embeddings.weight"].shape[0]) if "tok_embeddings.weight" in sd else 16384
        shape = {**GPT_CONFIGS[gpt_model], **dict(arch or {})}
        model = LlamaGenT2I.build(**shape, num_codes=num_codes, caption_dim=t5.config.d_model, rows=side, cols=side,
                                  attn_implementation=attn_implementation)
        model.load_official_state_dict(sd)
        model = model.to(resolve_dtype(dtype))
        vq, down = None, 16
        if vq_file is not None:
            vcfg = vq_config(num_codes=num_codes, **dict(vq_arch or {}))
            vq = load_vq(_torch_load(vq_file), vcfg, side, side)
            down = 2 ** (len(vcfg.channel_multiplier) - 1)
        bb = cls(model, vq, t5, tok, side, side, name=name or f"llamagen-t2i-xl-{image_size}", revision=revision,
                 clean_caption=clean_caption, strict_length=strict_length, vq_downsample=down)
        return bb

    def save_official(self, folder) -> dict:
        """Write this model as the official files (``gpt.pt``, ``vq.pt`` with ``{"model": state_dict}``, ``t5/``):
        what :meth:`from_pretrained` reads. Returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"gpt_path": folder / "gpt.pt", "t5_path": folder / "t5"}
        torch.save({"model": self.model.official_state_dict()}, paths["gpt_path"])
        self.t5.save_pretrained(paths["t5_path"])
        self.t5_tokenizer.save_pretrained(paths["t5_path"])
        if self.vq is not None:
            paths["vq_path"] = folder / "vq.pt"
            torch.save({"model": {vq_official_key(k): v for k, v in self.vq.state_dict().items()}}, paths["vq_path"])
        return {k: str(v) for k, v in paths.items()}

    @staticmethod
    def random_t5(seed: int = 0):
        """A tiny random FLAN-T5-style encoder and a word-level tokenizer (appends ``</s>``), no downloads."""
        from transformers import T5Config, T5EncoderModel

        from hawkspec.data.procedural import VOCAB_WORDS

        tok = word_tokenizer(VOCAB_WORDS, ["<pad>", "</s>"], bos=None, pad="<pad>", eos="</s>")
        tok.model_max_length = CAPTION_TOKENS
        config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0,
                          feed_forward_proj="gated-gelu", is_encoder_decoder=False)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        return model.eval(), tok

    @classmethod
    def random(cls, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> "LlamaGenBackbone":
        """A tiny random LlamaGen (Llama classes + our rotary, caption MLP, a tiny T5, a tiny VQ-16 architecture)."""
        t5, tok = cls.random_t5(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaGenT2I.build(dim=64, n_layer=2, n_head=2, num_codes=num_codes, caption_dim=t5.config.d_model,
                                      rows=rows, cols=cols, intermediate_size=128)
            model.uncond_embedding.copy_(torch.randn(CAPTION_TOKENS, t5.config.d_model) / t5.config.d_model ** 0.5)
            from transformers import JanusVQVAE

            vq = JanusVQVAE(vq_config(num_codes, base_channels=32, channel_multiplier=(1, 2), z_channels=32,
                                      num_res_blocks=1)).eval()
            vq.quantize.quant_state_dims = [rows, cols]
        return cls(model, vq, t5, tok, rows, cols, name="llamagen-random", revision=f"random-{seed}", vq_downsample=2)

    # ------------------------------------------------------------------------------- prompts
    def caption_text(self, prompt: str) -> str:
        """What the T5 tokenizer reads for ``prompt``: the official cleaning (``backbone.clean_caption``) or the
        lower-cased, stripped caption."""
        return clean_caption(prompt) if self.clean_caption else str(prompt).lower().strip()

    @torch.no_grad()
    def caption_features(self, prompts: list[str]) -> tuple[list[torch.Tensor], list[int]]:
        """T5 features of the valid tokens of each caption, (n_i, caption_dim) float32 on the CPU, and n_i."""
        texts = [self.caption_text(p) for p in prompts]
        full = self.t5_tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]  # lengths only
        too_long = [(i, len(ids)) for i, ids in enumerate(full) if len(ids) > CAPTION_TOKENS]
        if too_long:
            i, n = too_long[0]
            if self.strict_length:
                raise ValueError(
                    f"prompt {i} has {n} T5 tokens; LlamaGen reads {CAPTION_TOKENS} caption positions before the "
                    f"image (its max_position_embeddings = {CAPTION_TOKENS} + {self.grid.num_codes}): shorten the "
                    f"prompt or set backbone.strict_length=false (the official code keeps the first "
                    f"{CAPTION_TOKENS - 1} tokens and </s>)")
            log.warning("%d caption(s) over %d T5 tokens cut to %d as the official code does (prompt %d has %d; "
                        "backbone.strict_length=true refuses them)", len(too_long), CAPTION_TOKENS, CAPTION_TOKENS,
                        i, n)
        enc = self.t5_tokenizer(texts, max_length=CAPTION_TOKENS, padding="max_length", truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        dev = next(self.t5.parameters()).device
        hidden = self.t5(input_ids=enc.input_ids.to(dev), attention_mask=enc.attention_mask.to(dev)).last_hidden_state
        counts = enc.attention_mask.sum(1).tolist()
        return [hidden[i, :n].float().cpu() for i, n in enumerate(counts)], counts

    def encode(self, prompts: list[str]) -> PromptBatch:
        feats, counts = self.caption_features(prompts)
        cond = [[self.PAD_SLOT] * (CAPTION_TOKENS - n) + [self.CAPTION_SLOT] * n for n in counts]
        uncond = [[self.PAD_SLOT] * (CAPTION_TOKENS - n) + [self.NULL_SLOT] * n for n in counts]
        return PromptBatch(cond, uncond, {"caption": feats})

    # ------------------------------------------------------------------------------- model
    @property
    def transformer(self):
        return self.model.llama.model

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.llama.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if bool((input_ids >= self.PAD_SLOT).any()):
            raise ValueError("caption slots are embedded by prefill() from PromptBatch.extras['caption'], not embed()")
        return self.transformer.get_input_embeddings()(input_ids)

    def _caption_embeds(self, prompts: PromptBatch, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 120, d) caption-prefix embeddings and (N, 120) long key mask, conditional rows then unconditional."""
        rows = prompts.streams(cfg)
        B = len(prompts)
        dtype = self.dtype
        proj_dtype = self.model.caption_proj.fc1.weight.dtype
        raw = torch.zeros((len(rows), CAPTION_TOKENS, self.model.uncond_embedding.shape[1]), dtype=proj_dtype,
                          device=self.device)
        mask = torch.zeros((len(rows), CAPTION_TOKENS), dtype=torch.long, device=self.device)
        feats = prompts.extras.get("caption")
        for r, ids in enumerate(rows):
            if len(ids) != CAPTION_TOKENS:
                raise ValueError(f"a LlamaGen prompt has {CAPTION_TOKENS} caption slots, got {len(ids)}")
            ids_t = torch.tensor(ids, device=self.device)
            valid = ids_t != self.PAD_SLOT
            mask[r] = valid.long()
            if bool((ids_t == self.NULL_SLOT).any()):  # official: uncond_embedding at every slot, the prompt's mask
                raw[r] = self.model.uncond_embedding.to(proj_dtype)
            if bool((ids_t == self.CAPTION_SLOT).any()):
                if feats is None:
                    raise ValueError("PromptBatch.extras['caption'] is missing: encode prompts with LlamaGenBackbone.encode")
                f = feats[r % B].to(self.device, proj_dtype)  # left-padded; padded slots stay zero (official)
                raw[r, CAPTION_TOKENS - f.shape[0]:] = f
        return self.model.caption_proj(raw).to(dtype), mask

    def prefill_inputs(self, prompts: PromptBatch, cfg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 120 caption slots (features through the caption MLP, or the learned unconditional embedding), each at
        its own position 0..119, padded slots masked as keys."""
        embeds, mask = self._caption_embeds(prompts, cfg)
        pos = torch.arange(CAPTION_TOKENS, device=self.device).expand(embeds.shape[0], -1)
        return embeds, mask, pos

    def attention_maps(self, prompts: PromptBatch, body: torch.Tensor) -> torch.Tensor:
        raise TypeError("LlamaGenBackbone does not expose attention weights (its prompt is a caption-feature prefix)")

    # ------------------------------------------------------------------------------- image side
    def can_decode(self) -> tuple[bool, str]:
        if self.vq is None:
            return False, "the LlamaGen VQ decoder is not loaded: set backbone.vq_path to vq_ds16_t2i.pt"
        return True, ""

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        ok, why = self.can_decode()
        if not ok:
            raise FileNotFoundError(why)
        dev = next(self.vq.parameters()).device
        pixels = self.vq.decode(codes.reshape(codes.shape[0], -1).to(dev))  # official decode_code: l2-normed codebook
        return to_uint8_rounded(pixels).cpu()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Official VQ-16 quantisation: encoder, quant_conv, nearest L2-normalised codebook entry to normalised z."""
        ok, why = self.can_decode()
        if not ok:
            raise FileNotFoundError(why)
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px; this LlamaGen takes {self.image_size}")
        dev = next(self.vq.parameters()).device
        x = images.to(dev, next(self.vq.parameters()).dtype) / 127.5 - 1
        z = self.vq.quant_conv(self.vq.encoder(x))  # (B, c, h, w)
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        e = F.normalize(self.vq.quantize.embedding.weight, dim=-1)
        idx = (z @ e.T).argmax(-1)  # nearest unit vector
        return idx.to(self.device)

    def codebook_vectors(self) -> torch.Tensor:
        if self.vq is None:
            raise FileNotFoundError("LANTERN needs the VQ codebook: set backbone.vq_path to vq_ds16_t2i.pt")
        return F.normalize(self.vq.quantize.embedding.weight.detach(), dim=-1)
