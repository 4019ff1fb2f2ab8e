"""What the transformers adapters share to load a checkpoint, and what sizes one without loading it.

Loading (Janus, Emu3 and LlamaGen use it): the folder check that names the config key, the dtype by name, a short
weights hash for ``revision``, pixels to uint8 as the official scripts write them, and the word-level tokenizer
their tiny random models (``random``) are built with. Sizing (``python -m hawkspec.cli.footprint``): a backbone's
transformers config, its code grid and its parameter count on the meta device, read from the backbone config alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn


def word_tokenizer(words, specials: list[str], bos: str | None, pad: str, unk: str = "<unk>", extra=(),
                   eos: str | None = None):
    """A word-level ``PreTrainedTokenizerFast`` for tiny random models (no downloads): ``specials`` first (as
    special tokens, matched before splitting), then ``unk``, punctuation, digits and ``words``; text is split into
    words and punctuation runs; ``bos`` (if given) is prepended and ``eos`` (if given) appended by
    ``tokenizer(text)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in [*specials, unk, *":,.*!?'-\n", *"0123456789", *extra, *words]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    if bos is not None or eos is not None:
        single = " ".join(([bos] if bos else []) + ["$A"] + ([eos] if eos else []))
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t is not None])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad, bos_token=bos, eos_token=eos)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, pad, eos)]})
    return fast


def weights_hash(model: nn.Module, extra: bytes = b"") -> str:
    """A short hash of a model's weights (names, shapes and the first bytes of every tensor)."""
    h = hashlib.sha256(extra)
    for k, v in sorted(model.state_dict().items()):
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(v.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> uint8, as the official scripts write them (``clip((x+1)/2*255)``, cast)."""
    return ((images.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)


def require_dir(path, key: str, files: tuple[str, ...] = ("config.json",)) -> Path:
    """``path`` as a Path, or a FileNotFoundError naming the config ``key`` when it (or one of ``files``) is missing."""
    if path is None or str(path) in ("", "???"):
        raise FileNotFoundError(f"`{key}` is not set: point it at a local folder (weights are never downloaded)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"`{key}`={path} is not a folder")
    for name in files:
        if not (p / name).exists():
            raise FileNotFoundError(f"`{key}`={path} has no {name}")
    return p


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"backbone.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ------------------------------------------------------------------ sizing a checkpoint without loading it
def model_config(backbone_cfg) -> tuple[object, str]:
    """The transformers config of the backbone and where it came from."""
    from transformers import AutoConfig, ChameleonConfig

    target = str(backbone_cfg.get("_target_", ""))
    path = backbone_cfg.get("path")
    if target.startswith("hawkspec.backbones.tiny.") and not path:
        from hawkspec.backbones.tiny import DEFAULT_ASSET

        path = str(DEFAULT_ASSET)
    if path and (Path(str(path)).expanduser() / "config.json").is_file():
        return AutoConfig.from_pretrained(Path(str(path)).expanduser()), f"{Path(str(path)) / 'config.json'}"
    if ".chameleon." in target:
        return ChameleonConfig(vocabulary_map={}), ("transformers' ChameleonConfig defaults (the Chameleon / Lumina-mGPT 7B "
                                   "architecture; set backbone.path to a local checkpoint to read its config.json)")
    raise ValueError(f"cannot read the model config of backbone {target}: set backbone.path to a local folder with "
                     "config.json")


def grid_of(backbone_cfg, config) -> tuple[int, int, int, int]:
    """(rows, cols, tokens per row W, image-start tokens) without loading the model."""
    target = str(backbone_cfg.get("_target_", ""))
    if ".chameleon." in target:
        from hawkspec.backbones.chameleon import parse_resolution

        h, w = parse_resolution(backbone_cfg.get("resolution", 768))
        down = 2 ** (len(config.vq_config.channel_multiplier) - 1)
        return h // down, w // down, w // down + 1, 3
    if target.startswith("hawkspec.backbones.tiny."):
        path = Path(str(backbone_cfg.get("path") or "")) if backbone_cfg.get("path") else None
        if path is None:
            from hawkspec.backbones.tiny import DEFAULT_ASSET

            path = DEFAULT_ASSET
        lay = json.loads((path / "hawkspec.json").read_text())
        return lay["rows"], lay["cols"], lay["cols"] + 1, 1
    raise ValueError(f"footprint does not know the layout of {target}")


def count_parameters(config) -> int:
    """Parameters of the model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM, ChameleonForConditionalGeneration, LlamaForCausalLM

    cls = {"chameleon": ChameleonForConditionalGeneration, "llama": LlamaForCausalLM}.get(config.model_type)
    with torch.device("meta"):
        model = cls(config) if cls else AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
