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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hawkspec.backbones.base import Backbone, ImageGrid, KVState
from hawkspec.backbones.kv_cache import slab_cache
from hawkspec.vq.patch_vq import PatchVQ

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<image_start>", "<image_end>", "<eol>")
PAD, BOS, UNK, IMAGE_START, IMAGE_END, EOL = range(len(SPECIAL_TOKENS))
DEFAULT_ASSET = Path(__file__).resolve().parent.parent / "assets" / "tiny"


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
        """Word ids of a caption and the words not in the vocabulary (mapped to ``<unk>``)."""
        index = {w: i + self.word_offset for i, w in enumerate(self.words)}
        toks = [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]
        unknown = [t for t in toks if t not in index]
        return [index.get(t, UNK) for t in toks], unknown

    def image_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) codes -> (B, 1 + rows*W + 1) ids: image start, rows with eol, image end."""
        B = codes.shape[0]
        body = torch.cat([codes + self.code_offset, torch.full((B, self.rows, 1), EOL)], dim=2)
        return torch.cat(
            [torch.full((B, 1), IMAGE_START), body.reshape(B, -1), torch.full((B, 1), IMAGE_END)], dim=1
        )


class TinyBackbone(Backbone):
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
        self.eol_token_id, self.image_start_id, self.image_end_id = EOL, IMAGE_START, IMAGE_END
        self.max_length = model.config.max_position_embeddings
        self.register_buffer(
            "code_token_ids", torch.arange(layout.num_codes) + layout.code_offset, persistent=False
        )
        self.revision = revision or self._weights_hash()
        self._warned_unknown: set[str] = set()

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
    def from_pretrained(cls, path: str | Path | None = None) -> "TinyBackbone":
        """Load a folder written by :meth:`save_pretrained`; ``None`` loads the weights shipped with hawkspec."""
        path = Path(path) if path else DEFAULT_ASSET
        for name in ("config.json", "model.safetensors", "vq.safetensors", "hawkspec.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"tiny backbone checkpoint is missing {path / name}; set `backbone.path` to a folder written "
                    "by `hawkspec-pretrain` (or leave it null for the shipped weights)"
                )
        layout = TinyLayout(**json.loads((path / "hawkspec.json").read_text()))
        model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        vq = PatchVQ.from_file(path / "vq.safetensors")
        return cls(model.eval(), vq, layout)

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
    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        out = []
        for p in prompts:
            ids, unknown = self.layout.encode_words(p)
            for w in set(unknown) - self._warned_unknown:
                log.warning("word %r is not in the tiny model's vocabulary; it is read as <unk>", w)
                self._warned_unknown.add(w)
            out.append([BOS] + ids)
        return out

    def uncond_prompt_ids(self) -> list[int]:
        return [BOS]

    # ------------------------------------------------------------------------------- model
    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        start = self.layout.code_offset
        return F.linear(hidden, self.model.lm_head.weight[start : start + self.layout.num_codes])

    def check_prompt_lengths(self, prompt_ids: list[list[int]]) -> None:
        need = self.grid.length + 2  # image start + body + image end
        for i, p in enumerate(prompt_ids):
            if len(p) + need > self.max_length:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with the {need} image tokens it exceeds the context of "
                    f"{self.max_length} (backbone max_position_embeddings): shorten the prompt"
                )

    @torch.no_grad()
    def prefill(self, prompt_ids: list[list[int]], cfg: bool) -> tuple[KVState, torch.Tensor]:
        if not prompt_ids:
            raise ValueError("prefill needs at least one prompt")
        self.check_prompt_lengths(prompt_ids)
        seqs = [p + [IMAGE_START] for p in prompt_ids]
        if cfg:
            seqs += [self.uncond_prompt_ids() + [IMAGE_START]] * len(prompt_ids)
        N, L = len(seqs), max(len(s) for s in seqs)
        device = self.model.device
        ids = torch.full((N, L), PAD, dtype=torch.long)
        mask = torch.zeros((N, L), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding
            ids[i, L - len(s) :] = torch.tensor(s)
            mask[i, L - len(s) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = slab_cache()  # in-place writes: no cat of the whole cache per forward, free rewinds
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        state = KVState(cache=cache, key_mask=mask.bool(), next_pos=mask.sum(1), streams=2 if cfg else 1)
        return state, out.last_hidden_state[:, -1]

    @torch.no_grad()
    def forward(self, state, input_ids, tree_mask=None, depth=None):
        if state.pending:
            raise RuntimeError("the previous tree block was not compacted: call Backbone.compact first")
        N, T = input_ids.shape
        if depth is None:
            depth = torch.arange(T, device=input_ids.device)
        pos = state.next_pos[:, None] + depth  # (N, T)
        new = torch.ones((N, T), dtype=torch.bool, device=input_ids.device)
        if tree_mask is None:
            attn = torch.cat([state.key_mask, new], dim=1).long()  # (N, L+T); transformers adds causality
        else:
            L = state.length
            allowed = torch.cat(
                [state.key_mask[:, None, :].expand(N, T, L), tree_mask.expand(N, T, T)], dim=2
            )  # (N, T, L+T)
            dtype = self.model.dtype
            attn = torch.zeros((N, 1, T, L + T), dtype=dtype, device=input_ids.device)
            attn.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        out = self.model.model(
            input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=state.cache, use_cache=True
        )
        state.key_mask = torch.cat([state.key_mask, new], dim=1)
        if tree_mask is None:
            state.next_pos = state.next_pos + T
        else:
            state.pending = T
        return out.last_hidden_state

    @torch.no_grad()
    def compact(self, state: KVState, keep: torch.Tensor, count: torch.Tensor, prefix: bool = False) -> None:
        T = state.pending
        if not T:
            raise RuntimeError("compact() needs a pending tree block (forward with tree_mask first)")
        L0 = state.length - T
        A = keep.shape[1]
        idx = None
        for layer in state.cache.layers:  # every layer's keys and values have the same shape: one index
            k, v = layer.keys, layer.values  # (N, heads, L0+T, head_dim)
            if prefix:  # the kept nodes are already in place
                layer.keys, layer.values = k[:, :, : L0 + A], v[:, :, : L0 + A]
                continue
            if idx is None:
                idx = (L0 + keep)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k[:, :, L0 : L0 + A] = k.gather(2, idx)
            v[:, :, L0 : L0 + A] = v.gather(2, idx)
            layer.keys, layer.values = k[:, :, : L0 + A], v[:, :, : L0 + A]
        valid = torch.arange(A, device=keep.device)[None, :] < count[:, None]
        state.key_mask = torch.cat([state.key_mask[:, :L0], valid], dim=1)
        state.next_pos = state.next_pos + count
        state.pending = 0

    # ------------------------------------------------------------------------------- image side
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(codes.cpu())

    def code_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight[self.code_token_ids]

    def codebook_vectors(self) -> torch.Tensor:
        return self.vq.codebook_vectors
