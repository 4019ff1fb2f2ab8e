"""Small random models for tests, examples and statistical checks (no weights, no downloads)."""

from __future__ import annotations

import torch

from hawkspec.backbones.base import Backbone
from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.decoding.acceptance import ExactAcceptance
from hawkspec.data.procedural import VOCAB_WORDS
from hawkspec.vq.patch_vq import PatchVQ


def run_cli(name: str, *overrides: str, ok: bool = True, env: dict | None = None, timeout: int = 600):
    """Run console script ``name`` of this venv from the repository root (W&B disabled and Hydra's short errors
    unless ``env`` says otherwise) and assert it succeeded (``ok``) or failed; returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / name
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = subprocess.run([str(exe), *overrides], cwd=root, capture_output=True, text=True, env=env, timeout=timeout)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def build_random_backbone(rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> TinyBackbone:
    """A randomly initialised tiny backbone (transformers Llama classes), fast on a CPU."""
    return TinyBackbone.random(rows=rows, cols=cols, num_codes=num_codes, seed=seed)


RANDOM_BACKBONES: dict[str, str] = {
    "tiny": "hawkspec.backbones.tiny:TinyBackbone",
    "chameleon": "hawkspec.backbones.chameleon:ChameleonBackbone",
    "janus": "hawkspec.backbones.janus:JanusBackbone",
    "emu3": "hawkspec.backbones.emu3:Emu3Backbone",
    "llamagen": "hawkspec.backbones.llamagen:LlamaGenBackbone",
}
"""Every backbone adapter, ``name -> "module:Class"``. Each class has a ``random(rows, cols, num_codes, seed)``
classmethod that builds a tiny random model of its real transformers classes (no downloads; eval mode, CPU,
float32). The shared conformance suite (``tests/backbones/test_conformance.py``) runs on every entry whose
module exists: a new adapter adds one line here."""


def available_random_backbones() -> list[str]:
    """The names of :data:`RANDOM_BACKBONES` whose adapter module exists."""
    import importlib.util

    return [name for name, target in RANDOM_BACKBONES.items()
            if importlib.util.find_spec(target.split(":")[0]) is not None]


def random_backbone(name: str, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> Backbone:
    """The tiny random model of adapter ``name`` (see :data:`RANDOM_BACKBONES`)."""
    import importlib

    if name not in RANDOM_BACKBONES:
        raise KeyError(f"no random backbone {name!r}; known: {sorted(RANDOM_BACKBONES)}")
    module, cls = RANDOM_BACKBONES[name].split(":")
    return getattr(importlib.import_module(module), cls).random(rows=rows, cols=cols, num_codes=num_codes, seed=seed)


def peaky(backbone: Backbone, scale: float = 0.3, seed: int = 0) -> Backbone:
    """Overwrite every weight with N(0, scale^2) noise: a random model whose next-code distributions are
    peaked and prompt-dependent (what the enumerable losslessness test needs); returns the backbone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    backbone.__dict__.pop("_code_rows_cache", None)
    return backbone


def random_heads(backbone: Backbone, scale: float = 0.05, seed: int = 0, num_horizontal: int = 3,
                 vertical: bool = True, vsd: int = 1):
    """Draft heads for ``backbone`` whose ResBlock weights are N(0, scale^2) noise (the code head stays the
    backbone's): drafts that are sometimes right, sometimes wrong. Default: Hawk's 3 horizontal + 1 vertical."""
    from hawkspec.heads.draft import DraftHeads, HeadsConfig

    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=num_horizontal, vertical=vertical, vsd=vsd), backbone)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return heads


def build_tiny_clip(path, seed: int = 0):
    """Save a randomly initialised, tiny CLIP model and processor (transformers classes) to folder ``path``.

    The tokenizer knows the procedural captions' words (a word-level BPE vocabulary, no merges needed), the image
    processor resizes to 32 px. Loadable by ``CLIPModel`` / ``CLIPProcessor.from_pretrained(path)``, as a real
    CLIP checkpoint is: it exercises the CLIP-score path without downloading one.
    """
    import json
    from pathlib import Path

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(VOCAB_WORDS))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for w in VOCAB_WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    merges = ["#version: 0.2"]
    for w in VOCAB_WORDS:  # merge every word into one token, left to right
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def wandb_offline_records(run_file) -> list:
    """The records of an offline W&B run file (``offline-run-*/run-*.wandb``), parsed as ``wandb`` protobufs.

    The file is W&B's transaction log (a 7-byte ``:W&B`` header, then LevelDB-log blocks of 32 KiB whose records
    are full, or first / middle / last fragments); wandb >= 0.2x no longer ships a Python reader for it.
    """
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a W&B run file")
    block, head = 32768, 7
    pos, pending, chunks = head, b"", []
    while pos + head <= len(data):
        left = block - pos % block
        if left < head:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + head])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + head : pos + head + length]
        pos += head + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for chunk in chunks:
        rec = pb.Record()
        rec.ParseFromString(chunk)
        records.append(rec)
    return records


def wandb_offline_summary(run_file) -> dict:
    """The final summary of an offline W&B run: ``key -> JSON value string`` (nested keys joined by ``/``)."""
    summary = {}
    for rec in wandb_offline_records(run_file):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                summary[item.key or "/".join(item.nested_key)] = item.value_json
    return summary



class ExactByTries(ExactAcceptance):
    """The exact rule without the point-mass shortcut: every child is tried with ``try_candidate`` (the lossless
    tests' second reading of the exact rule)."""

    point_mass_shortcut = False  # the walk is chosen once, from this flag (hawkspec.decoding.walks.choose_walk)


class ForgetfulResidual(ExactByTries):
    """The classic bug the lossless tests must catch: after a rejection, siblings are still verified against the
    unreduced target."""

    def try_candidate(self, r, x, q, u):
        accepted, _ = super().try_candidate(r, x, q, u)
        return accepted, r


def compose(config_name: str, overrides=(), **kwargs):
    """``hydra.compose`` (inside ``initialize_config_dir``) with, for ``eval``, the short decoder spellings expanded
    as the console scripts expand them (``decoder=sjd`` -> the run's one decoder ``eval.decoders.sjd``)."""
    from hydra import compose as hydra_compose

    from hawkspec.cli.common import CONF_DIR
    from hawkspec.cli.overrides import expand

    overrides = list(overrides)
    if config_name == "eval":
        overrides = expand(overrides, CONF_DIR)
    return hydra_compose(config_name=config_name, overrides=overrides, **kwargs)


def the_decoder(cfg, name: str | None = None):
    """The node of decoder ``name`` of a composed run, or of its only decoder besides AR (``decoder=NAME``)."""
    nodes = cfg.eval.decoders
    if name is not None:
        return nodes[name]
    others = [n for n in nodes if n != "ar"] or list(nodes)
    if len(others) != 1:
        raise ValueError(f"the run has several decoders {list(nodes)}: name one")
    return nodes[others[0]]
