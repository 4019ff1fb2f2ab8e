"""Training data and Lightning module of the evaluator (:mod:`hawkspec.metrics.evaluator`).

The images are procedural renders (:mod:`hawkspec.data.procedural`, which knows every attribute), each used twice:
as rendered, and passed through the backbone's VQ tokenizer (``decode(encode(x))``), so that the classifier
reads generated images — which are always VQ decodes — as well as the real ones FID compares them with. A
fraction of each VQ'd image's codes (uniform in ``[0, code_noise]``) is replaced by random codes, a stand-in for
the sampling errors of a generated image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from hawkspec.data.procedural import ProceduralDataset, render
from hawkspec.metrics.evaluator import ATTRIBUTES, TinyEvaluator
from hawkspec.vq.patch_vq import PatchVQ


@dataclass
class EvaluatorSplit:
    """Images of one split and their labels.

    Attributes:
        raw: uint8 (N, 3, H, W) renders.
        vq: uint8 (N, 3, H, W) the same renders through the VQ (with code noise, if any).
        labels: long (N, A) class index of each attribute, in :data:`ATTRIBUTES` order.
    """

    raw: torch.Tensor
    vq: torch.Tensor
    labels: torch.Tensor


class backbone_tokenizer:
    """A backbone's own image tokenizer (:meth:`~hawkspec.backbones.base.Backbone.encode_images`,
    :meth:`~hawkspec.backbones.base.Backbone.decode_codes`) in the ``encode``/``decode`` form of a VQ."""

    def __init__(self, backbone):
        self.encode, self.decode, self.num_codes = backbone.encode_images, backbone.decode_codes, backbone.num_codes


def render_split(size: int, seed: int, image_size: int, vq, code_noise: float = 0.0,
                 batch: int = 2048) -> EvaluatorSplit:
    """Render ``ProceduralDataset(size, seed, image_size)`` and its VQ round trip (see the module docstring).

    ``vq`` is anything with ``encode`` / ``decode`` between images and codes and ``num_codes``: a
    :class:`~hawkspec.vq.patch_vq.PatchVQ`, or a backbone through :func:`backbone_tokenizer`."""
    if size < 1:
        raise ValueError(f"split size must be >= 1, got {size}")
    if not 0.0 <= code_noise < 1.0:
        raise ValueError(f"code_noise must be in [0, 1), got {code_noise}")
    ds = ProceduralDataset(size, seed=seed, image_size=image_size)
    raw = torch.empty(size, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.empty(size, len(ATTRIBUTES), dtype=torch.long)
    index = {k: {c: i for i, c in enumerate(v)} for k, v in ATTRIBUTES.items()}
    for i in range(size):
        scene = ds.scene(i)
        raw[i] = torch.from_numpy(render(scene, image_size)).permute(2, 0, 1)
        labels[i] = torch.tensor([index[k][getattr(scene, k)] for k in ATTRIBUTES])
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty_like(raw)
    for s in range(0, size, batch):
        codes = vq.encode(raw[s : s + batch])  # (b, h, w)
        if code_noise > 0:
            frac = torch.rand(codes.shape[0], 1, 1, generator=gen) * code_noise
            flip = torch.rand(codes.shape, generator=gen) < frac
            codes = torch.where(flip, torch.randint(vq.num_codes, codes.shape, generator=gen), codes)
        out[s : s + batch] = vq.decode(codes)
    return EvaluatorSplit(raw, out, labels)


@torch.no_grad()
def accuracy(model: TinyEvaluator, images: torch.Tensor, labels: torch.Tensor, batch: int = 512) -> dict[str, float]:
    """Top-1 accuracy of every attribute on ``images`` (uint8) against ``labels`` (N, A)."""
    model.eval()
    hits = torch.zeros(len(ATTRIBUTES))
    for s in range(0, len(images), batch):
        logits = model(images[s : s + batch])
        for a, k in enumerate(ATTRIBUTES):
            hits[a] += (logits[k].argmax(-1).cpu() == labels[s : s + batch, a]).sum()
    return {k: float(hits[a] / len(images)) for a, k in enumerate(ATTRIBUTES)}


class EvaluatorModule(L.LightningModule):
    """Cross-entropy summed over the attributes; validation logs per-attribute accuracy
    (``val/acc_{attribute}``) and their mean (``val/acc``).

    Args:
        model: The evaluator to train.
        optimizer: A factory ``params -> Optimizer`` (a ``_partial_`` config).
        scheduler: A factory ``(optimizer, num_training_steps) -> LR scheduler``, or None.
    """

    def __init__(self, model: TinyEvaluator, optimizer: Callable, scheduler: Callable | None = None) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def _losses(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch  # (B, 3, H, W) uint8, (B, A)
        logits = self.model(images)
        loss = sum(F.cross_entropy(logits[k], labels[:, a]) for a, k in enumerate(ATTRIBUTES))
        acc = {k: (logits[k].argmax(-1) == labels[:, a]).float().mean() for a, k in enumerate(ATTRIBUTES)}
        return loss, acc

    def training_step(self, batch, batch_idx):
        loss, _ = self._losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._losses(batch)
        self.log("val/loss", loss)
        for k, v in acc.items():
            self.log(f"val/acc_{k}", v)
        self.log("val/acc", torch.stack(list(acc.values())).mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        steps = self.trainer.estimated_stepping_batches
        sched = self.scheduler_factory(opt, num_training_steps=int(steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def training_tensors(split: EvaluatorSplit) -> torch.utils.data.TensorDataset:
    """Both views of every image (rendered and VQ'd) with their labels, as one dataset of 2N samples."""
    return torch.utils.data.TensorDataset(torch.cat([split.raw, split.vq]), torch.cat([split.labels, split.labels]))


def seed_worker_free_loader(dataset, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    """An in-process loader (the tensors are in memory), shuffled by a seeded generator."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0,
                                       generator=torch.Generator().manual_seed(seed) if shuffle else None)


def class_balance(split: EvaluatorSplit) -> dict[str, float]:
    """Majority-class share per attribute (the accuracy of always guessing the most common class)."""
    out = {}
    for a, k in enumerate(ATTRIBUTES):
        counts = np.bincount(split.labels[:, a].numpy(), minlength=len(ATTRIBUTES[k]))
        out[k] = float(counts.max() / counts.sum())
    return out
