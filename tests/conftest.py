"""Shared fixtures: a tiny random backbone saved like a real checkpoint, and W&B switched off."""

from __future__ import annotations

import pytest
import torch

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.testing import build_random_backbone


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state, so what a test sees does not depend on which tests ran
    before it (code that draws without an explicit generator uses the global one). ``HAWKSPEC_TEST_SEED`` changes
    the seed, to check that no assertion holds only by luck of one draw."""
    import os
    import random

    seed = int(os.environ.get("HAWKSPEC_TEST_SEED", "0"))
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    """Tests never talk to W&B unless a test re-enables it explicitly."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


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


def _write_cache(backbone, out_dir, num_samples: int = 12, shard_size: int = 4, batch_size: int = 4, seed: int = 0,
                source: str = "self", topk: int = 0, split: str = "train", sampling=None, callbacks=()):
    """Cache one split of ``backbone`` in-process (a single-device Lightning predict run); returns the plan."""
    from pathlib import Path

    import lightning as L

    from hawkspec.cache.plan import CachePlan
    from hawkspec.cache.predict import CacheModule
    from hawkspec.cache.runner import cache_split
    from hawkspec.cache.writer import ShardTarWriter
    from hawkspec.decoding.sampling import SamplingConfig

    sampling = sampling or SamplingConfig(top_k=32)
    plan = CachePlan(Path(out_dir) / split, split, num_samples, shard_size, batch_size, seed, source, topk,
                     {"temperature": sampling.temperature, "top_k": sampling.top_k, "cfg_scale": sampling.cfg_scale},
                     backbone.identity())
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[ShardTarWriter(), *callbacks])
    cache_split(trainer, CacheModule(backbone, sampling), plan)
    return plan


@pytest.fixture(scope="session")
def write_cache():
    """``write_cache(backbone, out_dir, num_samples=12, shard_size=4, ...)``: cache one split in-process."""
    return _write_cache


@pytest.fixture(scope="session")
def tiny_cache(random_backbone, tmp_path_factory) -> str:
    """A finished cache of the random backbone: train (12 samples, shards of 4) and val (4), top-8 targets."""
    root = tmp_path_factory.mktemp("cache")
    _write_cache(random_backbone, root, num_samples=12, topk=8, split="train", seed=0)
    _write_cache(random_backbone, root, num_samples=4, topk=8, split="val", seed=1)
    return str(root)


@pytest.fixture(scope="session")
def make_backbone():
    """Factory of other small random backbones: ``make_backbone(hidden_size=32, rows=3, cols=3, seed=1)``."""

    from hawkspec.data.procedural import VOCAB_WORDS
    from hawkspec.vq.patch_vq import PatchVQ

    def build(hidden_size: int = 64, rows: int = 4, cols: int = 4, num_codes: int = 512, seed: int = 0):
        vq = PatchVQ(num_codes=num_codes, patch_size=4)
        return TinyBackbone.build(
            list(VOCAB_WORDS), vq, rows=rows, cols=cols, hidden_size=hidden_size, num_layers=1, num_heads=2,
            intermediate_size=64, max_length=96, seed=seed,
        ).eval()

    return build
