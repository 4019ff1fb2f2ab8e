"""Fixtures of the fault-injection suite."""

import pytest


@pytest.fixture(scope="session")
def disk_cache(random_backbone_dir, write_cache, tmp_path_factory) -> str:
    """A finished cache (train: 12 samples in shards of 4, val: 4) of the backbone saved in ``random_backbone_dir``,
    as the console scripts load it (its revision matches)."""
    from hawkspec.backbones.tiny import TinyBackbone

    backbone = TinyBackbone.from_pretrained(random_backbone_dir)
    root = tmp_path_factory.mktemp("disk_cache")
    write_cache(backbone, root, num_samples=12, split="train", seed=0)
    write_cache(backbone, root, num_samples=4, split="val", seed=1)
    return str(root)
