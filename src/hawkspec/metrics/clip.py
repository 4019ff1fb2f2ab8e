"""CLIP score in the two conventions papers report, from a local CLIP model (a transformers ``save_pretrained`` folder).

===============  ==========================  =================================================================
convention       output key                  definition
===============  ==========================  =================================================================
``torchmetrics`` ``clip_score_100cos``       torchmetrics ``CLIPScore``: mean over images of 100 × max(cos, 0)
                                             (captions cut to the model's 77 tokens by torchmetrics)
``lantern``      ``clip_cosine_lantern``     LANTERN's ``eval_fid_clip.py``: mean raw cosine (no ×100, no floor)
                                             of the image with ``"A photo depicts " + caption`` (the prefix right
                                             after the start token), the text cut to 77 tokens (end token kept)
===============  ==========================  =================================================================

The two differ in scale (×100) and where cosines are negative; never compare one with the other. LANTERN used
ViT-B/32 (``openai/clip-vit-base-patch32``), torchmetrics' default and most speculative-decoding papers ViT-L/14:
the model folder is recorded next to the figures (``clip_model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

CLIP_CONVENTIONS = {"torchmetrics": "clip_score_100cos", "lantern": "clip_cosine_lantern"}
LANTERN_PREFIX = "A photo depicts "
CLIP_MAX_TOKENS = 77


def _clip_missing(path: str) -> str:
    return (f"eval.quality.clip_model={path} is not a saved CLIP model (no config.json): point it at a folder "
            "written by transformers' save_pretrained (e.g. a local copy of openai/clip-vit-large-patch14)")


class _ProjectedCLIP(nn.Module):
    """A transformers ``CLIPModel`` whose ``get_*_features`` return the projected embedding tensor.

    transformers 5 returns a ``BaseModelOutputWithPooling`` there, which torchmetrics 1.9's CLIPScore cannot read
    (torchmetrics issue #3407, fixed upstream after 1.9.0).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(path: str) -> tuple[_ProjectedCLIP, object]:
    """The CLIP model (eval mode) and processor saved in folder ``path``; local files only."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(_clip_missing(path))
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ValueError(f"eval.quality.clip_model={path}: cannot load a CLIP model and processor: {e}") from e
    return _ProjectedCLIP(model.eval()), processor


def build_clip_score(path: str, loaded: tuple | None = None):
    """torchmetrics ``CLIPScore`` (the ``torchmetrics`` convention) with the CLIP model saved in folder ``path``."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    loaded = loaded or load_clip(path)
    return CLIPScore(model_name_or_path=lambda: loaded)


@torch.no_grad()
def clip_cosines(model: _ProjectedCLIP, processor, images: torch.Tensor, captions: Sequence[str],
                 prefix: str = LANTERN_PREFIX, max_tokens: int = CLIP_MAX_TOKENS) -> torch.Tensor:
    """Raw cosine of each uint8 image (N, 3, H, W) with ``prefix + caption`` (the ``lantern`` convention, per image).

    The tokenizer puts the start token first, so the prefix follows it; the text is cut to ``max_tokens`` tokens
    (at most the model's context) with the end token kept, as ``clip.tokenize(..., truncate=True)`` does.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    device = next(model.parameters()).device
    limit = min(max_tokens, model.config.text_config.max_position_embeddings)
    text = processor.tokenizer([prefix + c for c in captions], padding=True, truncation=True, max_length=limit,
                               return_tensors="pt")
    pixels = processor.image_processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
    img = model.get_image_features(pixels.to(device))
    txt = model.get_text_features(text["input_ids"].to(device), text["attention_mask"].to(device))
    return torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
