"""Lumina-mGPT on transformers' Chameleon classes (``ChameleonForConditionalGeneration``), with the official
generation semantics of Alpha-VLLM/Lumina-mGPT (``inference_solver.py``, ``data/item_processor.py``).

Sequence of one image, token by token (ids looked up by name in the model's ``vocabulary_map``, never hard-coded)::

    <s> "Generate an image of {W}x{H} according to the following prompt:\\n{caption}" <reserved08706>   (prompt)
    <racm3:break> <reserved{8800+H/32}> <reserved{8800+W/32}>                                        (image start)
    (code x W/16, <reserved08799>) x H/16                                                            (body)
    <eoss>                                                                                            (image end)

* The prompt is the official conversation with one human turn and an empty assistant turn: BOS, the text, and
  the end-of-turn separator ``<reserved08706>`` (id 8710 in the real vocabulary), encoded as one string.
* The image start is ``<racm3:break>`` (what Chameleon calls "begin image"; id 8197) followed by the two size
  tokens, height then width, each counting 32-pixel grids (= 2 latents): ``<reserved08824>`` at 768 px (id 8828).
  ``backbone.image_start`` says where they come from. ``forced`` (default, what every speculative decoder on
  Lumina-mGPT does): written after the prompt, never sampled. ``sampled`` (the official ``inference_solver.py``):
  the model samples them from the conditional stream alone -- its CFG processor starts guiding at the first image
  code, its image-only mask too -- over the whole vocabulary, the image logits unmasked (the released checkpoints
  were tuned with ``--unmask_image_logits``), at the run's temperature: ``<racm3:break>`` under the *text* top-k
  (``InterleavedTopKLogitsWarper``'s ``text_top_k=10``: no image is open yet), each size token under the *image*
  top-k (``image_top_k``, the run's ``--top_k``: 2000). The official code then reads the image size from the
  sampled size tokens; here the grid is fixed by ``backbone.resolution``, so a prompt whose draw is not
  ``<racm3:break>`` (the official code would answer in text) or names another size (it would draw an image of
  that size) is refused with an error naming both. Otherwise the tokens equal the forced ones and so does every
  later distribution: ``sampled`` only spends three draws per prompt (from the generator :meth:`prefill` is given)
  and refuses what the official code would not have drawn at this size.
* Every row of ``W/16`` codes ends in the forced end-of-line ``<reserved08799>`` (id 8803); the image ends with
  ``<eoss>`` (id 8196).
* CFG: the unconditional stream is the image start alone -- the official processor feeds ``input_ids`` from the
  image start on, with no BOS and no text -- so ``PromptBatch.uncond`` is ``[]`` for every prompt; it sees the
  same body tokens (end-of-line included) as the conditional stream.
* Sampling: guidance on the raw logits (``uncond + s * (cond - uncond)``, ``s = sampling.cfg_scale``: 3 in
  ``conf/backbone/sampling/lumina_mgpt_*.yaml``; the official processor skips guidance only at exactly 1.0, so a
  scale below 1 still mixes and ``sampling.cfg_off_below_one`` stays false), then only image codes are allowed,
  then image top-k (``sampling.top_k``: 2000), then temperature -- the order of
  :func:`hawkspec.decoding.sampling.target_probs`.
* Image codes are the ``IMGIMG...Z`` entries of the vocabulary map (``ChameleonImageVocabularyMapping``: the
  letters A-J spell the VQ index); ``code_token_ids[k]`` is the BPE id of VQ code ``k``.
* HF's ``ChameleonForConditionalGeneration.forward`` masks every image token's logit (it is a chat model), so the
  adapter runs the inner ``model.model`` and scores the codes with their rows of ``lm_head`` (:class:`HFBackbone`).
* The Lumina-mGPT checkpoints store each attention's query/key LayerNorm per model-parallel group,
  ``(model_parallel_size, head_dim)`` (1 x 128 for 7B), where transformers expects one row per head
  (``num_heads x head_dim``): :func:`expand_qk_norms` repeats each group's row over its heads at load time
  (what Lumina's own ``ChameleonLayerNorm.repeat_param`` does in every forward).
* Pixels: transformers has the VQ encoder (``model.model.vqmodel``) but no decoder; the decoder is
  :mod:`hawkspec.vq.chameleon_vqgan`, loaded from ``backbone.vqgan_path`` (the official ``vqgan.ckpt``). Without
  it :meth:`can_decode` is False and runs save code grids instead of images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random as _random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, ChameleonConfig, ChameleonForConditionalGeneration

from hawkspec.backbones.base import ImageGrid, PromptBatch
from hawkspec.backbones.hf import HFBackbone
from hawkspec.vq.chameleon_vqgan import (
    ENCODER_PREFIXES,
    ChameleonVQGANDecoder,
    VQGANConfig,
    images_to_vq_input,
    load_vqgan_decoder,
    save_vqgan,
)

log = logging.getLogger(__name__)

#: The official prompt (``generate_examples/generate.py``): width first, then height.
PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{caption}"
BOS_TOKEN = "<s>"
PAD_TOKEN = "<pad>"
END_OF_TURN_TOKEN = "<reserved08706>"  # the conversation separator (Conversation.sep_token), id 8710
IMAGE_START_TOKEN = "<racm3:break>"  # id 8197
IMAGE_END_TOKEN = "<eoss>"  # id 8196
EOL_TOKEN = "<reserved08799>"  # id 8803
#: Pixels per size-token grid in Lumina-mGPT (its ``patch_size``): 2 latents of the 16x VQGAN.
SIZE_TOKEN_LATENTS = 2
#: ``backbone.image_start``: the image-start tokens written after the prompt (``forced``) or drawn by the model
#: as the official ``inference_solver.py`` does (``sampled``).
IMAGE_START_MODES = ("forced", "sampled")
#: The official ``create_logits_processor(text_top_k=10)``: the top-k of every token outside an image, so of
#: ``<racm3:break>``.
TEXT_TOP_K = 10
#: The official ``image_top_k`` default (``create_logits_processor(image_top_k=2000)``; ``generate.py`` passes
#: ``--top_k``): the top-k of the two size tokens, which come after ``<racm3:break>``.
IMAGE_TOP_K = 2000
#: transformers' names of the per-head query/key LayerNorm parameters.
QK_NORM_SUFFIXES = ("self_attn.q_norm.weight", "self_attn.q_norm.bias", "self_attn.k_norm.weight",
                    "self_attn.k_norm.bias")


def size_token(n: int) -> str:
    """The token of ``n`` grids (Lumina-mGPT's ``get_n_grids_token``): ``<reserved{8800+n:05d}>``."""
    return f"<reserved{8800 + n:05d}>"


def image_token_name(code: int) -> str:
    """The vocabulary name of VQ code ``code``: ``IMGIMG`` + its decimal digits spelled A-J + ``Z``."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def code_index_of(name: str) -> int:
    """Inverse of :func:`image_token_name` (``ChameleonImageVocabularyMapping.bpe2img``'s rule)."""
    return int("".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len("IMGIMG"):-1]))


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class LuminaLayout:
    """Token ids and sizes of Lumina-mGPT's image sequence at one resolution (from a vocabulary map).

    Attributes:
        height, width: Image size in pixels.
        rows, cols: Latent grid (codes), ``height / downsample`` by ``width / downsample``.
        image_start_ids: ``<racm3:break>``, the height size token, the width size token.
        eol_token_id, image_end_id, end_of_turn_id, bos_id, pad_id: The special tokens.
        code_token_ids: BPE id of VQ code ``k`` at index ``k``.
    """

    height: int
    width: int
    rows: int
    cols: int
    image_start_ids: tuple[int, ...]
    eol_token_id: int
    image_end_id: int
    end_of_turn_id: int
    bos_id: int
    pad_id: int
    code_token_ids: tuple[int, ...]

    @property
    def grid(self) -> ImageGrid:
        return ImageGrid(self.rows, self.cols, eol=True)


def parse_resolution(resolution) -> tuple[int, int]:
    """``backbone.resolution``: an int (square) or ``[height, width]`` in pixels."""
    if isinstance(resolution, (int, float)) and not isinstance(resolution, bool):
        h = w = int(resolution)
    else:
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError):
            raise ValueError(f"backbone.resolution must be an int or [height, width] in pixels, got {resolution!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"backbone.resolution must be positive, got {resolution!r}")
    return h, w


def lumina_layout(vocabulary_map: dict[str, int], resolution, downsample: int,
                  size_token_latents: int = SIZE_TOKEN_LATENTS) -> LuminaLayout:
    """The layout of Lumina-mGPT images at ``resolution`` (pixels) for a model with this vocabulary.

    Args:
        vocabulary_map: ``ChameleonConfig.vocabulary_map`` (token name -> id).
        resolution: ``backbone.resolution``, int or ``[height, width]``.
        downsample: Pixels per latent of the VQ model (16 for Chameleon's VQGAN).
        size_token_latents: Latents per size-token grid (2 in Lumina-mGPT).

    Raises:
        ValueError naming ``backbone.resolution`` when the size is not a whole number of grids or the
        vocabulary has no size token for it; naming the token when a special token is missing.
    """
    height, width = parse_resolution(resolution)
    grid_px = downsample * size_token_latents
    if height % grid_px or width % grid_px:
        raise ValueError(f"backbone.resolution={height}x{width} is not a multiple of {grid_px} pixels (a size "
                         f"token counts {size_token_latents} latents of the {downsample}x VQGAN): Lumina-mGPT "
                         "checkpoints are 512, 768 and 1024")

    def need(name: str, what: str) -> int:
        if name not in vocabulary_map:
            raise ValueError(f"the model's vocabulary_map has no {name} ({what}): not a Lumina-mGPT / Chameleon "
                             "checkpoint?")
        return int(vocabulary_map[name])

    sizes = []
    for side, px in (("height", height), ("width", width)):
        n = px // grid_px
        if size_token(n) not in vocabulary_map:
            raise ValueError(f"backbone.resolution={height}x{width}: the vocabulary has no size token {size_token(n)} "
                             f"for a {side} of {n} grids; Lumina-mGPT checkpoints are 512, 768 and 1024")
        sizes.append(int(vocabulary_map[size_token(n)]))
    codes: dict[int, int] = {}
    for name, i in vocabulary_map.items():
        if name.startswith("IMGIMG"):
            codes[code_index_of(name)] = int(i)
    if sorted(codes) != list(range(len(codes))) or not codes:
        raise ValueError("the vocabulary_map's IMGIMG...Z image tokens do not spell the codes 0..K-1")
    return LuminaLayout(
        height=height, width=width, rows=height // downsample, cols=width // downsample,
        image_start_ids=(need(IMAGE_START_TOKEN, "image start"), *sizes),
        eol_token_id=need(EOL_TOKEN, "end of line"), image_end_id=need(IMAGE_END_TOKEN, "image end"),
        end_of_turn_id=need(END_OF_TURN_TOKEN, "end of turn"), bos_id=need(BOS_TOKEN, "BOS"),
        pad_id=int(vocabulary_map.get(PAD_TOKEN, vocabulary_map[BOS_TOKEN])),
        code_token_ids=tuple(codes[k] for k in range(len(codes))),
    )


# ----------------------------------------------------------------------------------------------- loading
def expand_qk_norms(state: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Query/key LayerNorm parameters stored per model-parallel group -> one row per head (transformers' shape).

    Lumina-mGPT keeps ``q_norm``/``k_norm`` weight and bias as ``(groups, head_dim)`` (``groups`` =
    ``model_parallel_size``: 1 for 7B, 8 for 34B) and expands them in forward with ``repeat_interleave(heads //
    groups)``: heads ``[g * heads/groups, (g+1) * heads/groups)`` use row ``g``. transformers'
    ``ChameleonLayerNorm`` holds ``(heads, head_dim)``. Rows already per head, and every other entry, pass
    unchanged; a 1-D ``(head_dim,)`` parameter counts as one group.
    """
    out = dict(state)
    for key, value in state.items():
        if not key.endswith(QK_NORM_SUFFIXES):
            continue
        heads = num_heads if ".q_norm." in key else num_kv_heads
        rows = value.reshape(1, -1) if value.dim() == 1 else value
        groups = rows.shape[0]
        if groups == heads:
            continue
        if heads % groups:
            raise ValueError(f"{key} has {groups} groups of query/key-norm parameters, which does not divide the "
                             f"{heads} heads of the model config")
        out[key] = rows.repeat_interleave(heads // groups, dim=0).contiguous()
    return out


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    return [f for f in files if f.is_file()]


def _read_tensors(files: list[Path], keys: set[str]) -> dict[str, torch.Tensor]:
    """The tensors named ``keys`` from checkpoint files (safetensors read lazily)."""
    found: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in keys & set(sf.keys()):
                    found[k] = sf.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in sd.items() if k in keys})
    return found


def _resolve_local(path: str) -> Path:
    """A local folder for ``path`` (itself, or the hub snapshot ``from_pretrained`` has just downloaded)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))


def _checkpoint_revision(folder: Path, files: list[Path]) -> str:
    """A cheap identity of a checkpoint: config and, per weight file, its name, size and first/last MiB."""
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_chameleon(path: str, dtype: torch.dtype = torch.bfloat16, device: str | None = None,
                   attn_implementation: str = "sdpa") -> tuple[ChameleonForConditionalGeneration, dict]:
    """Load a Lumina-mGPT (or Chameleon) checkpoint into ``ChameleonForConditionalGeneration``.

    transformers loads every weight; the query/key norms, whose shape differs in Lumina-mGPT checkpoints, are then
    read from the files and expanded with :func:`expand_qk_norms`. Returns the model (eval, frozen) and
    ``{"folder", "revision", "vq_loaded"}``: whether the checkpoint had the VQ encoder (``model.vqmodel.*``; Lumina's
    fine-tuned checkpoints drop it).
    """
    import transformers

    folder = _resolve_local(path)
    files = _weight_files(folder)
    if not (folder / "config.json").is_file() or not files:
        raise FileNotFoundError(f"backbone.path={path}: {folder} has no config.json and *.safetensors / "
                                "pytorch_model*.bin (a Lumina-mGPT checkpoint folder or hub id, e.g. "
                                "Alpha-VLLM/Lumina-mGPT-7B-768)")
    config = ChameleonConfig.from_pretrained(folder)
    if not config.vocabulary_map:
        raise ValueError(f"backbone.path={path}: config.json has no vocabulary_map (not a Chameleon checkpoint)")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the q/k-norm mismatch is expected and fixed below
    try:
        model, info = ChameleonForConditionalGeneration.from_pretrained(
            folder, config=config, dtype=dtype, attn_implementation=attn_implementation,
            ignore_mismatched_sizes=True, output_loading_info=True,
            **({"device_map": device} if device else {}),
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    norms = {f"model.layers.{i}.{s}" for i in range(config.num_hidden_layers) for s in QK_NORM_SUFFIXES}
    stored = expand_qk_norms(_read_tensors(files, norms), config.num_attention_heads, config.num_key_value_heads)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in stored.items():
            params[k].copy_(v.to(params[k].dtype))
    missing = set(info.get("missing_keys", [])) - norms
    mismatched = {m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])} - norms
    not_vq = sorted(k for k in missing | mismatched if ".vqmodel." not in k)
    if not_vq or norms - set(stored):
        raise ValueError(f"backbone.path={path}: the checkpoint lacks or mis-shapes {(not_vq + sorted(norms - set(stored)))[:5]}")
    vq_loaded = not any(".vqmodel." in k for k in missing | mismatched)
    return model.eval().requires_grad_(False), {
        "folder": folder, "revision": _checkpoint_revision(folder, files), "vq_loaded": vq_loaded}


# ----------------------------------------------------------------------------------------------- adapter
class ChameleonBackbone(HFBackbone):
    """Lumina-mGPT (see the module docstring) as a :class:`~hawkspec.backbones.base.Backbone`.

    Args:
        model: The Chameleon model (``model.model`` is run; ``lm_head`` scores the codes).
        tokenizer: The text tokenizer of the checkpoint.
        resolution: Pixels, int or ``[height, width]`` (``backbone.resolution``).
        vqgan: The image decoder, or None (images are then not decoded: :meth:`can_decode`).
        vq_encoder: Whether ``model.model.vqmodel`` holds real encoder weights (:meth:`encode_images`).
        size_token_latents: Latents per size-token grid (2 in Lumina-mGPT).
        name: Backbone name recorded with heads and shards; default ``lumina-mgpt-{H}x{W}``.
        revision: Identifies the weights.
        prompt_template: The text around the caption (``{width}``, ``{height}``, ``{caption}``).
        image_start: ``forced`` or ``sampled`` (``backbone.image_start``; the module docstring).
        image_start_top_k: With ``sampled``, the top-k of the size tokens (the official image top-k; 0 or None:
            off); ``<racm3:break>`` always uses the text top-k 10.
        image_start_temperature: With ``sampled``, the temperature of the three draws (the official code uses
            the run's; 0: greedy).
    """

    def __init__(self, model: ChameleonForConditionalGeneration, tokenizer, resolution,
                 vqgan: ChameleonVQGANDecoder | None = None, vq_encoder: bool = True,
                 size_token_latents: int = SIZE_TOKEN_LATENTS, name: str | None = None,
                 revision: str | None = None, prompt_template: str = PROMPT_TEMPLATE, vqgan_reason: str = "",
                 image_start: str = "forced", image_start_top_k: int | None = IMAGE_TOP_K,
                 image_start_temperature: float = 1.0):
        super().__init__()
        if image_start not in IMAGE_START_MODES:
            raise ValueError(f"backbone.image_start must be one of {list(IMAGE_START_MODES)}, got {image_start!r}")
        if image_start_top_k is not None and (isinstance(image_start_top_k, bool) or int(image_start_top_k) < 0):
            raise ValueError(f"backbone.image_start_top_k must be >= 0 (0 or null: off), got {image_start_top_k!r}")
        if float(image_start_temperature) < 0:
            raise ValueError(f"backbone.image_start_temperature must be >= 0 (0: greedy), got "
                             f"{image_start_temperature}")
        self.image_start = image_start
        self.image_start_top_k = int(image_start_top_k or 0)
        self.image_start_temperature = float(image_start_temperature)
        self.model = model
        self.tokenizer = tokenizer
        self.vqgan = vqgan
        self.vq_encoder = vq_encoder
        self.prompt_template = prompt_template
        self._vqgan_reason = vqgan_reason
        vq = model.config.vq_config
        downsample = 2 ** (len(vq.channel_multiplier) - 1)
        self.layout = lumina_layout(model.config.vocabulary_map, resolution, downsample, size_token_latents)
        self._grid_px = downsample * size_token_latents
        lay = self.layout
        if vqgan is not None and (vqgan.config.downsample != downsample or vqgan.config.n_embed != len(lay.code_token_ids)):
            raise ValueError(f"backbone.vqgan_path: the VQGAN ({vqgan.config.n_embed} codes, {vqgan.config.downsample}x) "
                             f"does not match the model ({len(lay.code_token_ids)} codes, {downsample}x)")
        self.name = name or f"lumina-mgpt-{lay.height}x{lay.width}"
        self.grid = lay.grid
        self.hidden_size = model.config.hidden_size
        self.image_start_ids = list(lay.image_start_ids)
        self.eol_token_id, self.image_end_id, self.pad_token_id = lay.eol_token_id, lay.image_end_id, lay.pad_id
        self.max_length = model.config.max_position_embeddings
        self.image_size = (lay.height, lay.width)
        self.register_buffer("code_token_ids", torch.tensor(lay.code_token_ids, dtype=torch.long), persistent=False)
        self.revision = revision or self._weights_hash()

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | None = None, resolution=768, vqgan_path: str | None = None,
                        vqgan_config: str | None = None, tokenizer_path: str | None = None,
                        dtype: str = "bfloat16", device: str | None = None, attn_implementation: str = "sdpa",
                        size_token_latents: int = SIZE_TOKEN_LATENTS, name: str | None = None,
                        prompt_template: str = PROMPT_TEMPLATE, image_start: str = "forced",
                        image_start_top_k: int | None = IMAGE_TOP_K,
                        image_start_temperature: float = 1.0) -> "ChameleonBackbone":
        """Load Lumina-mGPT (``conf/backbone/lumina_mgpt_*.yaml``).

        Args:
            path: ``backbone.path``: a local checkpoint folder or a hub id (``Alpha-VLLM/Lumina-mGPT-7B-768``).
            resolution: ``backbone.resolution``: pixels, int or ``[height, width]``; must match the checkpoint.
            vqgan_path: ``backbone.vqgan_path``: the official ``vqgan.ckpt`` (or its folder); None: no images.
            vqgan_config: ``vqgan.yaml``; None: beside the checkpoint.
            tokenizer_path: The tokenizer folder / hub id; None: ``path``.
            dtype: ``float32``, ``bfloat16`` or ``float16``.
            device: Load onto this device (``cuda``); None loads on the CPU and leaves placement to the run
                (the CLIs move the backbone; under DDP Lightning does).
            attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (trees need an additive mask:
                ``sdpa`` or ``eager``).
            image_start, image_start_top_k, image_start_temperature: ``backbone.image_start`` (``forced`` or
                ``sampled``) and, for ``sampled``, the size tokens' top-k and the draws' temperature (the YAMLs
                take both from ``sampling``, as the official code does).
        """
        if not path:
            raise ValueError("backbone.path is not set: a Lumina-mGPT checkpoint folder or hub id, e.g. "
                             "backbone.path=Alpha-VLLM/Lumina-mGPT-7B-768")
        local = Path(str(path)).expanduser()
        if not local.exists() and (local.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") != 1):
            raise FileNotFoundError(f"backbone.path={path} does not exist (a local checkpoint folder, or a hub id "
                                    "such as Alpha-VLLM/Lumina-mGPT-7B-768)")
        torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                       "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(str(dtype))
        if torch_dtype is None:
            raise ValueError(f"backbone.dtype must be float32, bfloat16 or float16, got {dtype!r}")
        model, info = load_chameleon(str(path), torch_dtype, device, attn_implementation)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or info["folder"]))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no tokenizer in {tokenizer_path or path} (set backbone.tokenizer_path): {e}") from e
        vqgan, reason = None, ""
        if vqgan_path:
            vqgan, encoder_state = load_vqgan_decoder(vqgan_path, vqgan_config)
            vqgan = vqgan.to(device=next(model.parameters()).device)
            if not info["vq_loaded"]:  # Lumina's checkpoints drop the VQ encoder: take it from vqgan.ckpt
                result = model.model.vqmodel.load_state_dict(encoder_state, strict=False)
                if result.missing_keys:
                    raise ValueError(f"backbone.vqgan_path={vqgan_path} lacks the encoder keys {result.missing_keys[:5]}")
                info["vq_loaded"] = True
        else:
            reason = ("backbone.vqgan_path is not set (Lumina-mGPT's VQGAN decoder, ckpts/chameleon/tokenizer/"
                      "vqgan.ckpt, is not part of the transformers checkpoint)")
        return cls(model, tokenizer, resolution, vqgan=vqgan, vq_encoder=info["vq_loaded"],
                   size_token_latents=size_token_latents, name=name, revision=info["revision"],
                   prompt_template=prompt_template, vqgan_reason=reason, image_start=image_start,
                   image_start_top_k=image_start_top_k, image_start_temperature=image_start_temperature)

    @classmethod
    def random(cls, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0,
               with_vqgan: bool = True, **kwargs) -> "ChameleonBackbone":
        """A tiny random ``ChameleonForConditionalGeneration`` for tests (no downloads; eval, CPU, float32).

        Its vocabulary is built like the real one -- ``<s>``, ``<pad>``, image tokens named ``IMGIMG...Z``, the
        special and ``<reserved...>`` tokens, a few words -- but shuffled, so code ids are neither contiguous nor
        in code order. Grids of even size use Lumina's 2 latents per size token, others 1. VQ: a 4x VQGAN with
        32/64 channels (transformers' encoder, :mod:`hawkspec.vq.chameleon_vqgan` decoder) unless ``with_vqgan``
        is False. ``kwargs`` go to the constructor (``image_start=...``).
        """
        unit = SIZE_TOKEN_LATENTS if rows % 2 == 0 and cols % 2 == 0 else 1
        vocab, tokenizer = tiny_vocabulary(num_codes)
        vq = dict(embed_dim=32, num_embeddings=num_codes, latent_channels=32, resolution=4 * max(rows, cols),
                  base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[])
        config = ChameleonConfig(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, vq_config=vq, vocabulary_map=vocab,
            pad_token_id=vocab[PAD_TOKEN], bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab["</s>"],
            attn_implementation="sdpa",
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = ChameleonForConditionalGeneration(config).float().eval()
            with torch.no_grad():  # non-trivial per-head query/key norms
                for layer in model.model.layers:
                    for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                        norm.weight.normal_(1.0, 0.2)
                        norm.bias.normal_(0.0, 0.2)
            vqgan = None
            if with_vqgan:
                vqgan = ChameleonVQGANDecoder(VQGANConfig(
                    n_embed=num_codes, embed_dim=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32,
                    resolution=vq["resolution"])).eval()
                vqgan.quantize.embedding.weight.data.copy_(model.model.vqmodel.quantize.embedding.weight.data)
        model.requires_grad_(False)
        return cls(model, tokenizer, (4 * rows, 4 * cols), vqgan=vqgan.requires_grad_(False) if vqgan else None,
                   size_token_latents=unit, name="chameleon-random",
                   vqgan_reason="" if vqgan else "this random Chameleon was built without a VQGAN decoder", **kwargs)

    def save_pretrained(self, path: str | Path, vqgan_dir: str | Path | None = None) -> None:
        """Write the model and tokenizer like a transformers checkpoint (``config.json``, ``*.safetensors``,
        tokenizer files); with ``vqgan_dir``, also ``vqgan.ckpt`` + ``vqgan.yaml`` there (official key names)."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if vqgan_dir is not None:
            if self.vqgan is None:
                raise ValueError("this backbone has no VQGAN decoder to save")
            enc = {k: v for k, v in self.model.model.vqmodel.state_dict().items()
                   if k.startswith(ENCODER_PREFIXES)}
            save_vqgan(vqgan_dir, self.vqgan, enc)

    def _weights_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().flatten()[:1024].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------------------- prompts
    def prompt_text(self, caption: str) -> str:
        """The official instruction around ``caption``."""
        return self.prompt_template.format(width=self.layout.width, height=self.layout.height, caption=caption)

    def encode(self, prompts: list[str]) -> PromptBatch:
        """Conditional: BOS + the instruction + the end-of-turn token (encoded as one string, as the official
        conversation is); unconditional: nothing (the stream starts at the image start)."""
        lay = self.layout
        cond = []
        for caption in prompts:
            ids = self.tokenizer.encode(self.prompt_text(caption) + END_OF_TURN_TOKEN, add_special_tokens=False)
            if not ids or ids[-1] != lay.end_of_turn_id:
                raise ValueError(f"the tokenizer does not encode {END_OF_TURN_TOKEN} as one token "
                                 f"(id {lay.end_of_turn_id}): wrong backbone.tokenizer_path?")
            cond.append([lay.bos_id] + list(ids))
        return PromptBatch(cond, [[] for _ in cond])

    # ------------------------------------------------------------------------------- model
    @property
    def transformer(self):
        return self.model.model

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    # ------------------------------------------------------------------------------- image start
    @torch.no_grad()
    def prefill(self, prompts: PromptBatch, cfg: bool, reserve: int | None = None, round_to: int = 1,
                generator: torch.Generator | None = None):
        """:meth:`HFBackbone.prefill`; with ``backbone.image_start=sampled`` the model first draws the image start
        of every prompt (:meth:`sample_image_start`, from ``generator``: the decoder's own, or torch's global one
        when None), which must equal the forced tokens the prefill then runs."""
        if self.image_start == "sampled" and len(prompts):
            self.sample_image_start(prompts, generator)
        return super().prefill(prompts, cfg, reserve, round_to)

    @torch.no_grad()
    def teacher_forced(self, prompts: PromptBatch, body: torch.Tensor, cfg: bool = False) -> torch.Tensor:
        """:meth:`Backbone.teacher_forced`. A known body was drawn at this size, so its image start is given: never
        sampled here (the states are those decoding sees after a draw that passed)."""
        mode, self.image_start = self.image_start, "forced"
        try:
            return super().teacher_forced(prompts, body, cfg)
        finally:
            self.image_start = mode

    def _size_px(self, name: str) -> str:
        """Pixels a size token stands for (``<reserved{8800+n}>``: n grids of ``size_token_latents`` latents)."""
        m = re.fullmatch(r"<reserved(\d{5})>", name)
        n = int(m.group(1)) - 8800 if m else -1
        return str(n * self._grid_px) if n > 0 else "?"

    def _full_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """(N, vocab) float32 next-token logits of the whole vocabulary after each sequence (no cache, no mask on
        image tokens)."""
        ids, mask = self._left_padded(seqs)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = self._run(self.embed(ids), mask, pos).last_hidden_state[:, -1]
        return self.model.lm_head(hidden).float()

    def image_start_probs(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The official distribution of image-start token ``step`` (0: ``<racm3:break>``, 1: height, 2: width) from
        (..., vocab) logits: top-k (10 for step 0, the text top-k; ``image_start_top_k`` after it), then
        temperature. (..., vocab) float32; one-hot of the argmax at temperature 0."""
        from hawkspec.decoding.sampling import SamplingConfig, target_probs

        k = TEXT_TOP_K if step == 0 else self.image_start_top_k
        return target_probs(logits, SamplingConfig(temperature=self.image_start_temperature, top_k=k, cfg_scale=1.0))

    @torch.no_grad()
    def sample_image_start(self, prompts: PromptBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``<racm3:break>`` and the two size tokens of every prompt as the official ``inference_solver.py``
        does (module docstring): conditional stream only, no CFG, the whole vocabulary, temperature
        ``image_start_temperature``, top-k 10 for the first token and ``image_start_top_k`` for the size tokens.
        One uniform per prompt and token, in token order. Returns (B, 3) ids, which equal :attr:`image_start_ids`.

        Raises:
            ValueError naming the prompt when a draw differs from the forced tokens: no image start (the official
            code would continue in text), or size tokens of another size than ``backbone.resolution`` (it would
            draw an image of that size, which this run's grid cannot hold).
        """
        from hawkspec.decoding.sampling import sample

        lay, names = self.layout, {int(i): n for n, i in self.model.config.vocabulary_map.items()}
        seqs = [list(p) for p in prompts.cond]
        drawn = []
        for step in range(len(lay.image_start_ids)):
            probs = self.image_start_probs(self._full_logits(seqs), step)
            tok = probs.argmax(-1) if self.image_start_temperature == 0 else sample(probs, generator)
            drawn.append(tok)
            seqs = [s + [int(t)] for s, t in zip(seqs, tok.tolist())]
            if step == 0 and bool((tok != lay.image_start_ids[0]).any()):
                i = int((tok != lay.image_start_ids[0]).nonzero()[0, 0])
                got = names.get(int(tok[i]), int(tok[i]))
                raise ValueError(
                    f"backbone.image_start=sampled: for prompt {i} Lumina-mGPT drew {got!r} instead of "
                    f"{IMAGE_START_TOKEN}, so the official code would answer in text, not draw an image; this prompt "
                    "cannot be decoded as sampled (backbone.image_start=forced writes the image start)")
        drawn = torch.stack(drawn, dim=1)
        bad = (drawn != torch.tensor(lay.image_start_ids, device=drawn.device)).any(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            got = [names.get(int(t), str(int(t))) for t in drawn[i, 1:]]
            want = [names[int(t)] for t in lay.image_start_ids[1:]]
            raise ValueError(
                f"backbone.image_start=sampled: for prompt {i} Lumina-mGPT drew the size tokens {got[0]} {got[1]} "
                f"(height x width: {self._size_px(got[0])} x {self._size_px(got[1])} px) where backbone.resolution "
                f"asks for {lay.height} x {lay.width} ({want[0]} {want[1]}). The official code would go on drawing an "
                "image of the drawn size; this run's grid is fixed by backbone.resolution, so the prompt is refused "
                "(backbone.image_start=forced writes the configured size)")
        return drawn

    # ------------------------------------------------------------------------------- image side
    def can_decode(self) -> tuple[bool, str]:
        if self.vqgan is None:
            return False, self._vqgan_reason or "backbone.vqgan_path is not set"
        return True, ""

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        ok, why = self.can_decode()
        if not ok:
            raise RuntimeError(f"cannot decode images: {why}")
        return self.vqgan.decode(codes)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if not self.vq_encoder:
            raise RuntimeError("the checkpoint has no VQ encoder weights (model.vqmodel.*; Lumina-mGPT's fine-tuned "
                               "checkpoints drop them): set backbone.vqgan_path to the official vqgan.ckpt")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} pixels; this backbone encodes {self.image_size} "
                             "(backbone.resolution)")
        vq = self.model.model.vqmodel
        dtype = vq.quant_conv.weight.dtype
        out = []
        for part in images.split(8):
            x = images_to_vq_input(part.to(vq.quant_conv.weight.device), dtype)
            idx = vq.encode(x, return_dict=True).image_tokens  # (b*rows*cols,)
            out.append(idx.view(part.shape[0], self.grid.rows, self.grid.cols))
        return torch.cat(out).to(self.device)

    def codebook_vectors(self) -> torch.Tensor:
        if self.vq_encoder:
            return self.model.model.vqmodel.quantize.embedding.weight
        if self.vqgan is not None:
            return self.vqgan.codebook
        raise RuntimeError("no VQ codebook: the checkpoint has no model.vqmodel.* weights and backbone.vqgan_path "
                           "is not set (LANTERN's latent neighbours need the codebook)")


# ----------------------------------------------------------------------------------------------- tiny vocab
def tiny_vocabulary(num_codes: int, seed: int = 0):
    """A small shuffled Chameleon-like vocabulary and a word-level tokenizer over it (for :meth:`random`)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hawkspec.data.procedural import VOCAB_WORDS

    specials = [BOS_TOKEN, PAD_TOKEN, "</s>", "<unk>"]
    reserved = [END_OF_TURN_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, EOL_TOKEN, "<image>"]
    reserved += [size_token(n) for n in range(1, 65)]
    words = sorted(set(VOCAB_WORDS) | {"generate", "an", "image", "of", "according", "to", "the", "following",
                                         "prompt", ":", "x"})
    rest = [image_token_name(k) for k in range(num_codes)] + reserved + words
    _random.Random(seed).shuffle(rest)
    vocab = {name: i for i, name in enumerate(specials + rest)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token="</s>", unk_token="<unk>",
                                   pad_token=PAD_TOKEN, additional_special_tokens=reserved)
    return vocab, fast
