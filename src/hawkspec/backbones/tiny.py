"""The embedded default: a tiny text-to-image AR model on transformers' Llama classes.

Vocabulary (ids in this order)::

    <pad> <bos> <unk> <image_start> <image_end> <eol> | caption words ... | image codes 0..K-1

Sequence layout, like Lumina-mGPT: ``<bos> words... <image_start> (codes x cols, <eol>) x rows <image_end>``.
The unconditional prompt for classifier-free guidance is ``<bos>`` alone (learned by prompt dropout).

The weights live in a folder written by :meth:`TinyBackbone.save_pretrained`: ``config.json`` and
``model.safetensors`` (transformers' own format, loadable by ``LlamaForCausalLM.from_pretrained``),
``vq.safetensors`` (the image tokenizer) and ``hawkspec.json`` (the layout above).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hawkspec.backbones.base import ImageGrid, PromptBatch
from hawkspec.backbones.hf import HFBackbone
from hawkspec.vq.patch_vq import PatchVQ

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<image_start>", "<image_end>", "<eol>")
PAD, BOS, UNK, IMAGE_START, IMAGE_END, EOL = range(len(SPECIAL_TOKENS))
DEFAULT_ASSET = Path(__file__).resolve().parent.parent / "assets" / "tiny"

# Letters that NFKD does not take apart into an ASCII letter plus accents.
_ASCII_FOLD = {"ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l",
               "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ı": "i"}


def ascii_caption(text: str) -> tuple[str, list[str]]:
    """A caption in ASCII, as the tiny vocabulary reads it, and the pieces that have no ASCII form.

    ASCII text is returned unchanged (its tokenization never depends on this function). Otherwise the text is
    decomposed (NFKD) and its accents dropped ("ünïcödé" -> "unicode", "ﬁ" -> "fi", full-width letters -> ASCII);
    dashes become "-", other punctuation and spaces a space (all separators to the tokenizer, like their ASCII
    forms). What is left (CJK, emoji, other symbols) is dropped, each run of it read as a word break, and
    returned in order so that the caller can say so.
    """
    if text.isascii():
        return text, []
    out: list[str] = []
    dropped: list[str] = []
    piece: list[str] = []

    def flush() -> None:
        if piece:
            dropped.append("".join(piece))
            piece.clear()
            out.append(" ")

    for ch in unicodedata.normalize("NFKD", text):
        if ch.isascii():
            flush()
            out.append(ch)
        elif unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            if piece:  # a mark (or joiner) on a dropped character belongs to it; on a letter it is an accent
                piece.append(ch)
        elif ch in _ASCII_FOLD:
            flush()
            out.append(_ASCII_FOLD[ch])
        elif unicodedata.category(ch) == "Pd":
            flush()
            out.append("-")
        elif unicodedata.category(ch)[0] in "PZ" or ch.isspace():
            flush()
            out.append(" ")
        else:
            piece.append(ch)
    flush()
    return "".join(out), dropped


@dataclass
class TinyLayout:
    """The vocabulary and image layout of a tiny model (saved as ``hawkspec.json``).

    Attributes:
        words: Caption words, in id order after the special tokens.
        num_codes: K, the VQ codebook size.
        rows: Image rows in codes.
        cols: Image columns in codes.
        patch_size: Pixels per code side.
    """

    words: list[str]
    num_codes: int
    rows: int
    cols: int
    patch_size: int

    @property
    def word_offset(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def code_offset(self) -> int:
        return self.word_offset + len(self.words)

    @property
    def vocab_size(self) -> int:
        return self.code_offset + self.num_codes

    @property
    def grid(self) -> ImageGrid:
        return ImageGrid(self.rows, self.cols, eol=True)

    def encode_words(self, text: str) -> tuple[list[int], list[str]]:
        """Word ids of a caption and the words not in the vocabulary (mapped to ``<unk>``).

        Words are the runs of ``[a-z0-9]`` of the lower-cased caption; a non-ASCII caption is first made ASCII by
        :func:`ascii_caption` (what has no ASCII form is dropped; :meth:`TinyBackbone.encode` warns about it).
        """
        index = {w: i + self.word_offset for i, w in enumerate(self.words)}
        toks = [t for t in re.split(r"[^a-z0-9]+", ascii_caption(text)[0].lower()) if t]
        unknown = [t for t in toks if t not in index]
        return [index.get(t, UNK) for t in toks], unknown

    def image_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) codes -> (B, 1 + rows*W + 1) ids: image start, rows with eol, image end."""
        B = codes.shape[0]
        body = torch.cat([codes + self.code_offset, torch.full((B, self.rows, 1), EOL)], dim=2)
        return torch.cat(
            [torch.full((B, 1), IMAGE_START), body.reshape(B, -1), torch.full((B, 1), IMAGE_END)], dim=1
        )


class TinyBackbone(HFBackbone):
    """The embedded tiny model (see the module docstring).

    Args:
        model: A ``LlamaForCausalLM`` whose vocabulary follows ``layout``.
        vq: The patch VQ tokenizer of the images.
        layout: Vocabulary and grid.
        revision: Identifies the weights; defaults to a hash of them.
    """

    def __init__(self, model: LlamaForCausalLM, vq: PatchVQ, layout: TinyLayout, revision: str | None = None):
        super().__init__()
        if model.config.vocab_size != layout.vocab_size:
            raise ValueError(
                f"model vocab_size={model.config.vocab_size} does not match the layout's {layout.vocab_size} "
                "(hawkspec.json words/num_codes)"
            )
        if vq.num_codes != layout.num_codes:
            raise ValueError(f"VQ has {vq.num_codes} codes, layout (hawkspec.json) says {layout.num_codes}")
        self.model = model
        self.vq = vq
        self.layout = layout
        self.name = "tiny"
        self.grid = layout.grid
        self.hidden_size = model.config.hidden_size
        self.eol_token_id, self.image_end_id, self.pad_token_id = EOL, IMAGE_END, PAD
        self.image_start_ids = [IMAGE_START]
        self.max_length = model.config.max_position_embeddings
        side = layout.patch_size
        self.image_size = (layout.rows * side, layout.cols * side)
        self.register_buffer(
            "code_token_ids", torch.arange(layout.num_codes) + layout.code_offset, persistent=False
        )
        self.revision = revision or self._weights_hash()
        self._warned_unknown: set[str] = set()
        self._warned_dropped: set[str] = set()

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        words: list[str],
        vq: PatchVQ,
        rows: int = 12,
        cols: int = 12,
        hidden_size: int = 192,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 512,
        max_length: int = 256,
        seed: int = 0,
    ) -> "TinyBackbone":
        """A freshly initialised tiny model (what ``hawkspec-pretrain`` trains)."""
        layout = TinyLayout(list(words), vq.num_codes, rows, cols, vq.patch_size)
        config = LlamaConfig(
            vocab_size=layout.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_length,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=IMAGE_END,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        return cls(model, vq, layout, revision="untrained")

    @classmethod
    def random(cls, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> "TinyBackbone":
        """A small randomly initialised tiny model for tests (:data:`hawkspec.testing.RANDOM_BACKBONES`)."""
        from hawkspec.data.procedural import VOCAB_WORDS

        return cls.build(list(VOCAB_WORDS), PatchVQ(num_codes=num_codes, patch_size=4), rows=rows, cols=cols,
                         hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_length=96,
                         seed=seed).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "TinyBackbone":
        """Load a folder written by :meth:`save_pretrained`; ``None`` loads the weights shipped with hawkspec."""
        path = Path(path) if path else DEFAULT_ASSET
        for name in ("config.json", "model.safetensors", "vq.safetensors", "hawkspec.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"tiny backbone checkpoint is missing {path / name}; set `backbone.path` to a folder written "
                    "by `hawkspec-pretrain` (or leave it null for the shipped weights)"
                )
        from hawkspec.io import check_safetensors

        for name in ("model.safetensors", "vq.safetensors"):  # a cut-off file is named, not a bare SafetensorError
            check_safetensors(path / name, "the tiny backbone's weights", "Remake it: `make pretrain` rewrites the "
                              "shipped model (src/hawkspec/assets/tiny); for your own, rerun `hawkspec-pretrain "
                              "export_dir=...`, or set `backbone.path` to an intact folder (null: the shipped one)")
        layout = TinyLayout(**json.loads((path / "hawkspec.json").read_text()))
        model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        vq = PatchVQ.from_file(path / "vq.safetensors")
        return cls(model.eval(), vq, layout)

    # ------------------------------------------------------------------------------- pretraining
    def lm_parameters(self):
        """The transformer's parameters (what ``hawkspec-pretrain`` trains; the VQ is fitted separately)."""
        return self.model.parameters()

    def lm_loss(self, batch: dict) -> torch.Tensor:
        """Next-token cross-entropy of a batch of full sequences (``input_ids``, ``attention_mask``, ``labels``)."""
        return self.model(**batch, use_cache=False).loss

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.vq.save(path / "vq.safetensors")
        (path / "hawkspec.json").write_text(json.dumps(asdict(self.layout), indent=1))

    def _weights_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
        h.update(self.vq.codebook.numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------------------- prompts
    def encode(self, prompts: list[str]) -> PromptBatch:
        cond = []
        for p in prompts:
            dropped = ascii_caption(p)[1]
            if dropped and p not in self._warned_dropped:
                log.warning("prompt %r: dropped %s, which the tiny model's ASCII vocabulary cannot spell (accents "
                            "are removed, punctuation is a word break; the rest is lost)",
                            p, ", ".join(repr(d) for d in dropped))
                self._warned_dropped.add(p)
            ids, unknown = self.layout.encode_words(p)
            for w in set(unknown) - self._warned_unknown:
                log.warning("word %r is not in the tiny model's vocabulary; it is read as <unk>", w)
                self._warned_unknown.add(w)
            cond.append([BOS] + ids)
        return PromptBatch(cond, [[BOS] for _ in cond])

    # ------------------------------------------------------------------------------- model
    @property
    def transformer(self):
        return self.model.model

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    # ------------------------------------------------------------------------------- image side
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(codes.cpu())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(images.to(self.vq.codebook.device)).to(self.device)

    def codebook_vectors(self) -> torch.Tensor:
        return self.vq.codebook_vectors
