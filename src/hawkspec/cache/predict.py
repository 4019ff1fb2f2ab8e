"""The cache writer as Lightning prediction: one ``predict_step`` computes one whole shard.

``trainer.predict(CacheModule(...))`` iterates over the shards this rank owns and has not written yet (see
:mod:`hawkspec.cache.plan`); :class:`hawkspec.cache.writer.ShardTarWriter` writes each result. The shard list is
an ``IterableDataset`` built per rank, so Lightning never wraps it in a padding ``DistributedSampler``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from hawkspec.backbones.base import Backbone
from hawkspec.cache.plan import CachePlan
from hawkspec.cache.sources import dataset_codes, procedural_captions, self_codes
from hawkspec.cache.teacher import body_codes, teacher_forced_states
from hawkspec.data import image_text
from hawkspec.data.manifest import sample_key
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.io import NonFiniteError

log = logging.getLogger(__name__)


class ShardJobs(IterableDataset):
    """The shard indices one rank computes, in order (sized, so the progress bar counts shards)."""

    def __init__(self, indices: list[int]):
        self.indices = list(indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class ShardData:
    """Everything one shard holds (numpy, on the CPU), sample ``j`` in row ``j``.

    Attributes:
        index: The shard index.
        keys: Sample keys (``s000000123``).
        captions: The captions.
        hidden: (n, rows*W + 1, d) float16.
        codes: (n, rows*W) int16, -1 at forced positions.
        topk_probs: (n, rows*W + 1, topk) float16, or None.
        topk_idx: (n, rows*W + 1, topk) int16, or None.
    """

    index: int
    keys: list[str]
    captions: list[str]
    hidden: np.ndarray
    codes: np.ndarray
    topk_probs: np.ndarray | None = None
    topk_idx: np.ndarray | None = None

    def samples(self):
        """The WebDataset samples of the shard, one dict per sample."""
        for j, key in enumerate(self.keys):
            sample = {"__key__": key, "txt": self.captions[j], "hidden.npy": self.hidden[j], "codes.npy": self.codes[j]}
            if self.topk_probs is not None:
                sample["topk_probs.npy"] = self.topk_probs[j]
                sample["topk_idx.npy"] = self.topk_idx[j]
            yield sample


def to_float16(x: torch.Tensor, what: str, keys: list[str] | None = None) -> np.ndarray:
    """fp16 numpy copy of ``x`` (B, ...); refuses NaN / Inf and values fp16 cannot hold, naming the samples."""
    out = x.detach().to(torch.float16).cpu().numpy()
    if not np.isfinite(out).all():
        rows = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        names = [k for k, bad in zip(keys or range(len(out)), rows) if bad]
        cause = "is NaN or Inf" if not torch.isfinite(x).all() else \
            f"overflows float16 (max |x| = {x.abs().max().item():.3g}; the cache stores fp16)"
        raise NonFiniteError(f"{what} of sample(s) {names[:5]} {cause}; nothing was written")
    return out


class CacheModule(L.LightningModule):
    """Frozen backbone + how to make the sequences of one split (``plan``; swap it between splits).

    Args:
        backbone: The frozen model.
        sampling: The target distribution (self-generated sequences and cached top-k).
        plan: The split to compute.
    """

    def __init__(self, backbone: Backbone, sampling: SamplingConfig, plan: CachePlan | None = None):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.sampling = sampling
        self.plan = plan
        # A rank may have no shard left to write (resuming, or fewer shards than ranks): let it idle.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_dataloader(self) -> DataLoader:
        plan = self._require_plan()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        todo = plan.pending(rank, world)
        skipped = len(plan.assigned(rank, world)) - len(todo)
        log.info("%s split: rank %d/%d writes %d shards (%d already written)",
                 plan.split, rank, world, len(todo), skipped)
        return DataLoader(ShardJobs(todo), batch_size=None, num_workers=0)

    def _require_plan(self) -> CachePlan:
        if self.plan is None:
            raise RuntimeError("CacheModule.plan is not set: assign the CachePlan of the split to compute")
        return self.plan

    @torch.no_grad()
    def compute_shard(self, index: int) -> ShardData:
        """All samples of shard ``index`` (a function of the plan and ``index`` only)."""
        plan = self._require_plan()
        start, stop = plan.shard_range(index)
        generator = torch.Generator(device=self.device).manual_seed(plan.shard_seed(index))
        if plan.source == "images":  # real image-caption pairs (hawkspec.data.image_text)
            captions = image_text.captions_for(plan.images, plan.split, start, stop)
        else:
            captions = procedural_captions(plan.seed, start, stop)
        parts: dict[str, list[np.ndarray]] = {"hidden": [], "codes": [], "probs": [], "idx": []}
        for a in range(start, stop, plan.batch_size):
            b = min(a + plan.batch_size, stop)
            prompts = captions[a - start : b - start]
            if plan.source == "self":
                codes = self_codes(self.backbone, prompts, self.sampling, generator)
            elif plan.source == "images":
                codes = image_text.image_codes(self.backbone, plan.images, plan.split, a, b)
            else:
                codes = dataset_codes(self.backbone, plan.seed, a, b)
            hidden, probs, idx = teacher_forced_states(self.backbone, prompts, codes, self.sampling, plan.topk)
            keys = [sample_key(i) for i in range(a, b)]
            parts["hidden"].append(to_float16(hidden, f"the hidden state in shard {index}", keys))  # (B, Lb+1, d)
            parts["codes"].append(body_codes(self.backbone.grid, codes).to(torch.int16).cpu().numpy())  # (B, Lb)
            if plan.topk:
                parts["probs"].append(probs.to(torch.float16).cpu().numpy())  # (B, Lb+1, topk)
                parts["idx"].append(idx.to(torch.int16).cpu().numpy())
        cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
        return ShardData(
            index=index, keys=[sample_key(i) for i in range(start, stop)], captions=captions,
            hidden=cat["hidden"], codes=cat["codes"], topk_probs=cat["probs"], topk_idx=cat["idx"],
        )

    def predict_step(self, index: int, batch_idx: int = 0) -> ShardData:
        return self.compute_shard(int(index))
