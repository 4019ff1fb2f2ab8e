"""Small random models for tests, examples and statistical checks (no weights, no downloads)."""

from __future__ import annotations

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.data.procedural import VOCAB_WORDS
from hawkspec.vq.patch_vq import PatchVQ


def build_random_backbone(rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> TinyBackbone:
    """A randomly initialised tiny backbone (transformers Llama classes), fast on a CPU."""
    vq = PatchVQ(num_codes=num_codes, patch_size=4)
    return TinyBackbone.build(
        list(VOCAB_WORDS), vq, rows=rows, cols=cols, hidden_size=64, num_layers=2, num_heads=2,
        intermediate_size=128, max_length=96, seed=seed,
    ).eval()
