"""Janus-Pro (DeepSeek) on transformers' Janus classes.

Layout of one sequence (official ``generation_inference.py`` of deepseek-ai/Janus)::

    <bos> "<|User|>: {caption}\\n\\n<|Assistant|>:" <begin_of_image> code x 576

The prompt is the DeepSeek chat template with an empty system prompt (``apply_sft_template_for_multi_turn_prompts``
with a user turn and an empty assistant turn), then the begin-of-image token. The image is 24 x 24 codes at 384 px
(``vision_config.image_size // patch_size``), written without end-of-line tokens and without an end token: the
official code samples 576 codes and decodes them.

Image codes are not text tokens. They are read through the *generation* embedding and its aligner
(``prepare_embeddings_for_image_generation``) and scored by the *generation head*, not the LM head. The adapter
therefore gives codes their own id space past the text vocabulary: code ``k`` has input id ``V_text + k``, and
:meth:`JanusBackbone.embed` routes every id to the right embedding.

Classifier-free guidance is batch-doubled: the unconditional row of a prompt is the same sequence with every
token but the first (``<bos>``) and the last (``<begin_of_image>``) replaced by the pad token, all attended
(official: ``tokens[i, 1:-1] = pad_id``; transformers' ``generate(generation_mode="image")`` keeps ``<bos>`` and
the begin-of-image token too). Official defaults: CFG 5, temperature 1, no top-k.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from hawkspec.backbones.base import ImageGrid, PromptBatch
from hawkspec.backbones.hf import HFBackbone
from hawkspec.backbones.loading import require_dir, resolve_dtype, to_uint8, weights_hash, word_tokenizer

log = logging.getLogger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
BEGIN_OF_IMAGE = "<begin_of_image>"
#: The DeepSeek chat template (sft_format "deepseek", empty system prompt) of one user turn and an empty assistant
#: turn, as ``VLChatProcessor.apply_sft_template_for_multi_turn_prompts`` writes it.
PROMPT_TEMPLATE = "<|User|>: {caption}\n\n<|Assistant|>:"


# ------------------------------------------------------------------------------------------------ the adapter
class JanusBackbone(HFBackbone):
    """Janus-Pro as a :class:`~hawkspec.backbones.base.Backbone` (see the module docstring).

    Args:
        model: A ``JanusForConditionalGeneration``.
        tokenizer: Its tokenizer (adds ``<bos>``; knows the pad and begin-of-image tokens).
        name: Backbone name recorded in heads and shards.
        revision: Identifies the weights; defaults to a hash of them.
        attn_implementation: ``sdpa`` or ``eager`` (both take the 4-D float tree masks).
    """

    def __init__(self, model, tokenizer, name: str = "janus-pro", revision: str | None = None,
                 attn_implementation: str | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        if attn_implementation is not None:
            self.model.set_attn_implementation(attn_implementation)
        self.tokenizer = tokenizer
        cfg = model.config
        self.text_vocab = cfg.text_config.vocab_size
        rows, cols = model.model.vqmodel.quantize.quant_state_dims  # num_patches x num_patches (24 x 24)
        self.grid = ImageGrid(int(rows), int(cols), eol=False)
        self.name = name
        self.hidden_size = cfg.text_config.hidden_size
        self.bos_token_id = self._token_id(tokenizer.bos_token or BOS, "bos")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = self._token_id(PAD, "pad")
        self.pad_token_id = int(pad)
        self.image_start_ids = [self._token_id(BEGIN_OF_IMAGE, "begin-of-image")]
        self.eol_token_id = None
        self.image_end_id = None
        self.max_length = cfg.text_config.max_position_embeddings
        up = 2 ** (len(cfg.vq_config.channel_multiplier) - 1)
        self.image_size = (rows * up, cols * up)
        K = cfg.vq_config.num_embeddings
        self.register_buffer("code_token_ids", torch.arange(K) + self.text_vocab, persistent=False)
        self.revision = revision or weights_hash(model)

    def _token_id(self, token: str, what: str) -> int:
        i = self.tokenizer.convert_tokens_to_ids(token)
        if i is None or i == self.tokenizer.unk_token_id:
            raise ValueError(f"the Janus tokenizer has no {what} token {token!r}")
        return int(i)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path, dtype: str = "bfloat16", attn_implementation: str = "sdpa",
                        name: str = "janus-pro-7b", revision: str | None = None,
                        image_size: int | None = None) -> "JanusBackbone":
        """Load a transformers Janus checkpoint folder (e.g. ``deepseek-community/Janus-Pro-7B``) from disk.

        Args:
            path: The folder (``config.json``, weights, tokenizer); never downloaded.
            dtype: ``bfloat16`` (official), ``float16`` or ``float32``.
            attn_implementation: ``sdpa`` or ``eager`` (both take 4-D float masks).
            image_size: The resolution the config asks for, in pixels; an error naming ``backbone.image_size`` if
                the checkpoint generates another (Janus-Pro: 384 only). None skips the check.
        """
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        path = require_dir(path, "backbone.path")
        model = JanusForConditionalGeneration.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                              attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
        bb = cls(model, tokenizer, name=name, revision=revision)
        if image_size is not None and tuple(bb.image_size) != (int(image_size), int(image_size)):
            raise ValueError(f"backbone.image_size={image_size}: the Janus checkpoint at {path} generates "
                             f"{bb.image_size[0]}x{bb.image_size[1]} px images only")
        return bb

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @staticmethod
    def random_tokenizer():
        from hawkspec.data.procedural import VOCAB_WORDS

        specials = [PAD, BOS, "<｜end▁of▁sentence｜>", BEGIN_OF_IMAGE, "<end_of_image>", "<image_placeholder>",
                    "<|User|>", "<|Assistant|>"]
        return word_tokenizer(VOCAB_WORDS, specials, bos=BOS, pad=PAD)

    @classmethod
    def random_model(cls, side: int = 4, num_codes: int = 512, seed: int = 0, tokenizer=None):
        """A tiny random ``JanusForConditionalGeneration`` (the real classes, small config)."""
        from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig

        tokenizer = tokenizer or cls.random_tokenizer()
        d = 64
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
        patch = 4
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=side * patch,
                      patch_size=patch, projection_dim=d, num_image_tokens=side * side, mlp_ratio=2.0)
        vq = dict(embed_dim=8, num_embeddings=num_codes, latent_channels=32, base_channels=32,
                  channel_multiplier=[1, 2], num_res_blocks=1, projection_dim=d, image_token_embed_dim=d)
        config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = JanusForConditionalGeneration(config)
        gc = model.generation_config
        gc.bos_token_id, gc.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
        gc.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids(BEGIN_OF_IMAGE)}
        return model.eval(), tokenizer

    @classmethod
    def random(cls, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> "JanusBackbone":
        """A tiny random Janus for tests (:data:`hawkspec.testing.RANDOM_BACKBONES`). Real Janus grids are square
        (``num_patches``^2); a rectangular test grid only reshapes the VQ's ``quant_state_dims``."""
        model, tokenizer = cls.random_model(max(rows, cols), num_codes, seed)
        model.model.vqmodel.quantize.quant_state_dims = [rows, cols]
        model.model.vision_model.config.num_image_tokens = rows * cols  # what generate(generation_mode="image") writes
        return cls(model, tokenizer, name="janus-random", revision=f"random-{seed}")

    # ------------------------------------------------------------------------------- prompts
    def prompt_text(self, caption: str) -> str:
        return PROMPT_TEMPLATE.format(caption=caption)

    def encode(self, prompts: list[str]) -> PromptBatch:
        cond, uncond = [], []
        for p in prompts:
            ids = list(self.tokenizer(self.prompt_text(p), add_special_tokens=True)["input_ids"])
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
            cond.append(ids)
            # official: tokens[1:-1] = pad over prompt + <begin_of_image>: <bos>, pads, then the image start
            uncond.append([self.bos_token_id] + [self.pad_token_id] * (len(ids) - 1))
        return PromptBatch(cond, uncond)

    # ------------------------------------------------------------------------------- model
    @property
    def transformer(self):
        return self.model.model.language_model

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text ids through the text embedding, code ids (``>= V_text``) through the generation embedding and
        its aligner (``prepare_embeddings_for_image_generation``)."""
        text_embed = self.transformer.get_input_embeddings()
        is_code = input_ids >= self.text_vocab
        if not bool(is_code.any()):
            return text_embed(input_ids)
        inner = self.model.model
        if bool(is_code.all()):
            return inner.generation_aligner(inner.generation_embeddings(input_ids - self.text_vocab))
        out = text_embed(input_ids.masked_fill(is_code, 0))
        codes = inner.generation_aligner(inner.generation_embeddings(input_ids[is_code] - self.text_vocab))
        out[is_code] = codes.to(out.dtype)
        return out

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.generation_head(hidden)

    def code_head(self) -> nn.Module:
        return copy.deepcopy(self.model.model.generation_head).requires_grad_(False).eval()

    # ------------------------------------------------------------------------------- image side
    @property
    def vq(self):
        return self.model.model.vqmodel

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        B = codes.shape[0]
        pixels = self.vq.decode(codes.reshape(B, -1).to(self.device))
        return to_uint8(pixels).cpu()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px; the Janus VQ takes {self.image_size}")
        x = images.to(self.device, self.vq.dtype) / 127.5 - 1
        tokens = self.vq.encode(x).image_tokens
        return tokens.view(images.shape[0], self.grid.rows, self.grid.cols).to(self.device)

    def codebook_vectors(self) -> torch.Tensor:
        """The VQ codebook, L2-normalised as the decoder reads it (``get_codebook_entry``)."""
        return F.normalize(self.vq.quantize.embedding.weight.detach(), p=2, dim=-1)
