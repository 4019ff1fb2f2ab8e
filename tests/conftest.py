"""Shared fixtures: a tiny random backbone saved like a real checkpoint, and W&B switched off."""

from __future__ import annotations

import pytest
import torch

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.data.procedural import VOCAB_WORDS
from hawkspec.vq.patch_vq import PatchVQ


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    """Tests never talk to W&B unless a test re-enables it explicitly."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


def build_random_backbone(rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0) -> TinyBackbone:
    """A small randomly initialised tiny backbone (fast on a CPU)."""
    vq = PatchVQ(num_codes=num_codes, patch_size=4)
    return TinyBackbone.build(
        list(VOCAB_WORDS), vq, rows=rows, cols=cols, hidden_size=64, num_layers=2, num_heads=2,
        intermediate_size=128, max_length=96, seed=seed,
    ).eval()


@pytest.fixture(scope="session")
def random_backbone() -> TinyBackbone:
    return build_random_backbone()


@pytest.fixture(scope="session")
def random_backbone_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_random")
    build_random_backbone().save_pretrained(path)
    return str(path)


@pytest.fixture
def prompts() -> list[str]:
    return ["a large red circle in the center", "a small blue square on the left on a plain white background"]


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
