"""Emu3-Gen (BAAI) on transformers' Emu3 classes.

Layout of one sequence (official ``Emu3Processor`` in mode ``G`` and its generation example)::

    <bos> "{caption} masterpiece, film grained, best quality." <|image start|> "90*90" <|image token|>
    (code x 90, <|extra_200|>) x 90  <|extra_201|> <|image end|> <eos>

* The caption gets the official quality suffix (``POSITIVE_PROMPT``); the image start is followed by the size
  string ``"{H}*{W}"`` (tokens of the latent grid, from ``ratio`` and ``image_area`` as the processor computes
  them: 1:1 at 518,400 px^2 -> 720 px -> 90 x 90) and the image-token wrapper.
* Every row ends with the end-of-line token ``<|extra_200|>`` (W = 91); after the last row the official prefix
  constraint forces ``<|extra_201|>`` (end of frame: our image end), then ``<|image end|>`` and ``<eos>``.
* CFG runs the official negative prompt (``NEGATIVE_PROMPT``) as the unconditional stream, with the same image
  start (official: ``processor(text=NEGATIVE_PROMPT, mode="G")``); transformers'
  ``UnbatchedClassifierFreeGuidanceLogitsProcessor`` mixes log-softmaxed logits, which differ from raw logits by a
  per-row constant: same distribution after top-k and softmax.
* Codes are the vocabulary's ``<|visual token######|>`` entries (``Emu3ImageVocabularyMapping.img2bpe``), scored
  by their LM-head rows. Official sampling: top-k 2048, CFG 3, T 1.

The model is put in eval mode (its config has attention dropout 0.1) and always gets explicit position ids
(transformers' default would count cache slots, not the tokens each row has committed).
"""

from __future__ import annotations

import logging

import torch

from hawkspec.backbones.base import ImageGrid, PromptBatch
from hawkspec.backbones.hf import HFBackbone
from hawkspec.backbones.loading import require_dir, resolve_dtype, to_uint8, weights_hash, word_tokenizer

log = logging.getLogger(__name__)

POSITIVE_PROMPT = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
                   "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")
BOS = "<|extra_203|>"
EOS = "<|extra_204|>"
PAD = "<|endoftext|>"
IMAGE_START = "<|image start|>"
IMAGE_END = "<|image end|>"
IMAGE_WRAPPER = "<|image token|>"
EOL = "<|extra_200|>"
EOF = "<|extra_201|>"


def generate_size(ratio: str, image_area: int, spatial_factor: int) -> tuple[int, int]:
    """(rows, cols) of the latent grid for an aspect ``ratio`` "W:H" and a pixel area, as ``Emu3Processor`` computes
    them (``calculate_generate_size``)."""
    try:
        width, height = map(int, str(ratio).split(":"))
    except ValueError:
        raise ValueError(f"backbone.ratio={ratio!r}: expected 'W:H', e.g. '1:1'") from None
    if width <= 0 or height <= 0 or image_area <= 0:
        raise ValueError(f"backbone.ratio={ratio!r} / backbone.image_area={image_area}: both must be positive")
    scale = (image_area / (width * height)) ** 0.5
    return int(round(height * scale / spatial_factor)), int(round(width * scale / spatial_factor))


class Emu3Backbone(HFBackbone):
    """Emu3-Gen as a :class:`~hawkspec.backbones.base.Backbone` (see the module docstring).

    Args:
        model: An ``Emu3ForConditionalGeneration``.
        tokenizer: Its tokenizer (knows the Emu3 special tokens; does not add ``<bos>`` itself).
        rows, cols: The latent grid (codes); see :func:`generate_size`.
        positive_prompt: Appended to every caption (official quality suffix).
        negative_prompt: The unconditional stream's text.
        name, revision: Identity recorded in heads and shards (revision defaults to a hash of the weights).
        attn_implementation: ``sdpa`` or ``eager`` (both take 4-D float masks).
    """

    def __init__(self, model, tokenizer, rows: int = 90, cols: int = 90, positive_prompt: str = POSITIVE_PROMPT,
                 negative_prompt: str = NEGATIVE_PROMPT, name: str = "emu3-gen", revision: str | None = None,
                 attn_implementation: str | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)  # eval: the config has attention dropout
        if attn_implementation is not None:
            self.model.set_attn_implementation(attn_implementation)
        self.tokenizer = tokenizer
        self.positive_prompt, self.negative_prompt = positive_prompt, negative_prompt
        cfg = model.config
        mapping = model.model.vocabulary_mapping
        img2bpe = mapping.img2bpe
        K = cfg.vq_config.codebook_size
        missing = [k for k in range(K) if k not in img2bpe]
        if missing:
            raise ValueError(f"the vocabulary map has no <|visual token######|> entry for codes {missing[:5]}...")
        self.register_buffer("code_token_ids", torch.tensor([img2bpe[k] for k in range(K)]), persistent=False)
        self.grid = ImageGrid(int(rows), int(cols), eol=True)
        self.name = name
        self.hidden_size = cfg.text_config.hidden_size
        self.bos_token_id = self._token_id(tokenizer.bos_token or BOS, "bos")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.text_config.pad_token_id
        self.pad_token_id = int(pad)
        size = tokenizer(f"{rows}*{cols}", add_special_tokens=False)["input_ids"]
        self.image_start_ids = [self._token_id(IMAGE_START, "image start"), *size,
                                self._token_id(IMAGE_WRAPPER, "image wrapper")]
        self.eol_token_id = self._token_id(EOL, "end-of-line")
        self.image_end_id = self._token_id(EOF, "end-of-frame")
        self.max_length = cfg.text_config.max_position_embeddings
        self.spatial_factor = model.model.vqmodel.spatial_scale_factor
        self.image_size = (rows * self.spatial_factor, cols * self.spatial_factor)
        if len(self.image_start_ids) + self.grid.length + 1 >= self.max_length:
            raise ValueError(f"a {rows}x{cols} image takes {self.grid.length} tokens: more than the model's context "
                             f"of {self.max_length}; lower backbone.image_area")
        self.revision = revision or weights_hash(model)

    def _token_id(self, token: str, what: str) -> int:
        i = self.tokenizer.convert_tokens_to_ids(token)
        if i is None or i == self.tokenizer.unk_token_id:
            raise ValueError(f"the Emu3 tokenizer has no {what} token {token!r}")
        return int(i)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path, dtype: str = "bfloat16", attn_implementation: str = "sdpa", ratio: str = "1:1",
                        image_area: int = 518400, positive_prompt: str = POSITIVE_PROMPT,
                        negative_prompt: str = NEGATIVE_PROMPT, name: str = "emu3-gen",
                        revision: str | None = None) -> "Emu3Backbone":
        """Load a transformers Emu3 checkpoint folder (e.g. ``Emu3-community/Emu3-Gen-hf``) from disk.

        ``ratio`` and ``image_area`` set the grid as the official processor does (defaults: 1:1 at 720 x 720 px,
        90 x 90 codes); an image that does not fit the model's context is an error naming ``backbone.image_area``.
        """
        from transformers import AutoTokenizer, Emu3ForConditionalGeneration

        path = require_dir(path, "backbone.path")
        model = Emu3ForConditionalGeneration.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                             attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
        rows, cols = generate_size(ratio, int(image_area), model.model.vqmodel.spatial_scale_factor)
        return cls(model, tokenizer, rows, cols, positive_prompt, negative_prompt, name=name, revision=revision)

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @staticmethod
    def random_tokenizer(num_codes: int):
        from hawkspec.data.procedural import VOCAB_WORDS

        specials = [PAD, BOS, EOS, IMAGE_START, IMAGE_END, IMAGE_WRAPPER, EOL, EOF, "<image>"]
        visual = [f"<|visual token{k:06d}|>" for k in range(num_codes)]
        words = sorted(set(VOCAB_WORDS) | set(" ".join([POSITIVE_PROMPT, NEGATIVE_PROMPT]).replace(",", " ")
                                               .replace(".", " ").split()))
        return word_tokenizer(words, specials + visual, bos=None, pad=PAD, extra=())

    @classmethod
    def random_model(cls, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0, tokenizer=None):
        """A tiny random ``Emu3ForConditionalGeneration`` (the real classes, small config) and its tokenizer."""
        from transformers import Emu3Config, Emu3ForConditionalGeneration

        tokenizer = tokenizer or cls.random_tokenizer(num_codes)
        vocab = tokenizer.get_vocab()
        text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    pad_token_id=vocab[PAD], bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                    attention_dropout=0.1)
        vq = dict(codebook_size=num_codes, embed_dim=4, latent_channels=4, base_channels=32,
                  channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=4,
                  hidden_size=64, num_attention_heads=1)  # VQ attention width = last block's channels
        config = Emu3Config(text_config=text, vq_config=vq, vocabulary_map=dict(vocab))
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Emu3ForConditionalGeneration(config)
        gc = model.generation_config
        gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = vocab[BOS], vocab[PAD], vocab[EOS]
        return model.eval(), tokenizer

    @classmethod
    def random(cls, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> "Emu3Backbone":
        """A tiny random Emu3 for tests (:data:`hawkspec.testing.RANDOM_BACKBONES`)."""
        model, tokenizer = cls.random_model(rows, cols, num_codes, seed)
        return cls(model, tokenizer, rows, cols, name="emu3-random", revision=f"random-{seed}")

    # ------------------------------------------------------------------------------- prompts
    def _ids(self, text: str) -> list[int]:
        # the processor writes "<bos>" + text; the GPT-style tokenizer adds nothing itself
        return [self.bos_token_id] + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompts: list[str]) -> PromptBatch:
        cond = [self._ids(p + self.positive_prompt) for p in prompts]
        neg = self._ids(self.negative_prompt)
        return PromptBatch(cond, [list(neg) for _ in prompts])

    # ------------------------------------------------------------------------------- model
    @property
    def transformer(self):
        return self.model.model.text_model

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    # ------------------------------------------------------------------------------- image side
    @property
    def vq(self):
        return self.model.model.vqmodel

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        pixels = self.vq.decode(codes.to(self.device))  # (B, rows, cols) -> (B, 3, H, W) in [-1, 1]
        return to_uint8(pixels).cpu()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px; this Emu3 grid takes {self.image_size}")
        x = images.to(self.device, self.vq.dtype) / 127.5 - 1
        sizes = torch.tensor([list(self.image_size)] * images.shape[0])
        return torch.stack(self.vq.encode(x, sizes).image_tokens).to(self.device)

    def codebook_vectors(self) -> torch.Tensor:
        return self.vq.quantize.embedding.weight.detach()
